"""The data dir is private after a start (B1): umask 077, the dir 0700, an open tree tightened."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from embervm.server.datadir import secure_data_dir


@pytest.fixture(autouse=True)
def _restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {
        str(path.relative_to(root)): stat.S_IMODE(path.lstat().st_mode)
        for path in [root, *root.rglob("*")]
        if not path.is_symlink()
    }


def _open_tree(root: Path, outside: Path) -> None:
    """What an older server left under a traversable data dir: everything 0644/0755."""
    for folder in ("vms/mvm-1", "images", "run"):
        (root / folder).mkdir(parents=True, mode=0o755)
        os.chmod(root / folder, 0o755)
    for name in ("embervm.db", "vms/mvm-1/memory", "vms/mvm-1/disk.qcow2", "run/x.sock"):
        (root / name).write_bytes(b"secret")
        os.chmod(root / name, 0o644)
    (root / "credentials").write_bytes(b"k")
    os.chmod(root / "credentials", 0o600)
    (root / "images" / "elsewhere").symlink_to(outside)
    os.chmod(root, 0o755)


def test_an_open_data_dir_is_closed_and_nothing_below_is_readable_by_others(
    tmp_path: Path,
) -> None:
    # B1: VM memory, disks and the DB were 0644 under a 0755 data dir.
    root, outside = tmp_path / "data", tmp_path / "not-ours"
    outside.write_bytes(b"")
    os.chmod(outside, 0o644)
    root.mkdir()
    _open_tree(root, outside)
    tightened = secure_data_dir(root)
    modes = _modes(root)
    assert {name: mode for name, mode in modes.items() if mode & 0o077} == {}
    assert modes["."] == 0o700
    assert modes["vms/mvm-1/memory"] == 0o600
    assert tightened == 1 + 8  # the dir, 4 folders and 4 files (credentials already was)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a symlink is not followed


def test_what_the_server_creates_after_the_start_is_private(tmp_path: Path) -> None:
    secure_data_dir(tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    (tmp_path / "new" / "log").write_text("x")
    (tmp_path / "new" / "sub").mkdir()
    assert stat.S_IMODE((tmp_path / "new" / "log").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new" / "sub").stat().st_mode) == 0o700


def test_a_private_data_dir_is_not_walked(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir(mode=0o700)
    (root / "left-open").write_bytes(b"")
    os.chmod(root / "left-open", 0o644)
    assert secure_data_dir(root) == 0  # the 0700 dir already closes it to others
    assert stat.S_IMODE((root / "left-open").stat().st_mode) == 0o644

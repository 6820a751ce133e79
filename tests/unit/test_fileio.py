"""embervm.fileio: atomic replacement with an exact mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from embervm.fileio import atomic_write


def test_atomic_write_replaces_with_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_text("old")
    old = os.umask(0o000)
    try:
        atomic_write(target, b"new", mode=0o600)
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "dir-target"
    target.mkdir()
    (target / "x").write_text("keep")
    with pytest.raises(IsADirectoryError):
        atomic_write(target, "new")  # a non-empty directory cannot be replaced by a file
    assert (target / "x").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir-target"]

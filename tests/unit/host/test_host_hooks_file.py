"""The hooks saved at launch are written durably and read back (A22)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from embervm.host.hooks import RuntimeHooks

HOOKS = {"port": 9000, "microvmHooks": {"suspend": "ENABLED", "suspendTimeoutInSeconds": 5}}


def test_saved_hooks_are_fsynced_private_and_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A22: hooks.json was renamed into place without an fsync of the file or its folder.
    import embervm.fileio

    synced: list[Path] = []
    real = embervm.fileio.fsync_dir
    monkeypatch.setattr(embervm.fileio, "fsync_dir", lambda p: (synced.append(p), real(p)))
    hooks = RuntimeHooks.from_model(HOOKS)
    hooks.save(tmp_path / "hooks.json")
    assert synced == [tmp_path]
    assert stat.S_IMODE((tmp_path / "hooks.json").stat().st_mode) == 0o600
    assert RuntimeHooks.load(tmp_path / "hooks.json") == hooks
    assert [p.name for p in tmp_path.iterdir()] == ["hooks.json"]  # no temporary file left

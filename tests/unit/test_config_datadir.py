"""The data dir's layout is spelled in one place (``config.DataDir``) and Settings follows it."""

from __future__ import annotations

from pathlib import Path

from embervm.config import DataDir, Settings


def test_every_path_is_inside_the_data_dir_and_distinct(tmp_path: Path) -> None:
    layout = DataDir(tmp_path)
    names = [n for n in dir(DataDir) if isinstance(getattr(DataDir, n), property)]
    paths = [getattr(layout, n) for n in names]
    assert all(p.is_relative_to(tmp_path) and p != tmp_path for p in paths)
    assert len(set(paths)) == len(paths)


def test_settings_paths_are_the_data_dir_s(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    layout = DataDir(tmp_path)
    assert settings.tls_dir == layout.tls
    assert settings.credentials_file == layout.credentials
    assert settings.token_keys_file == layout.token_keys
    assert settings.sqlite_url.endswith(str(layout.database))
    assert settings.paths == layout

"""What a fleet role needs before anything starts (``server.roles.check_fleet_settings``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.config import Settings
from embervm.errors import ConfigError
from embervm.server.roles import check_fleet_settings

PG = "postgresql+asyncpg://embervm@127.0.0.1:5432/embervm"


@pytest.mark.parametrize("role", ["api", "proxy", "host"])
def test_every_fleet_role_refuses_sqlite(tmp_path: Path, role: str) -> None:
    for url in (None, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"):
        settings = Settings(data_dir=tmp_path, role=role, database_url=url)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="needs PostgreSQL"):
            check_fleet_settings(settings)


@pytest.mark.parametrize(
    ("host_id", "advertise", "problem"),
    [
        (None, "10.0.0.5:8790", "needs --host-id NAME and --advertise"),
        ("h1", None, "needs --host-id NAME and --advertise"),
        ("H_1", "10.0.0.5:8790", "host id 'H_1'"),
        ("h1", "10.0.0.5", "host address '10.0.0.5'"),
    ],
)
def test_a_host_needs_a_valid_name_and_address(
    tmp_path: Path, host_id: str | None, advertise: str | None, problem: str
) -> None:
    settings = Settings(
        data_dir=tmp_path, role="host", database_url=PG, host_id=host_id, advertise=advertise
    )
    with pytest.raises(ConfigError, match=problem):
        check_fleet_settings(settings)


def test_valid_fleet_settings_pass(tmp_path: Path) -> None:
    check_fleet_settings(Settings(data_dir=tmp_path, role="api", database_url=PG))
    host = Settings(
        data_dir=tmp_path,
        role="host",
        database_url=PG,
        host_id="h1",
        advertise="[fd00::5]:8790",
    )
    check_fleet_settings(host)

"""Fixtures of the control-API-through-real-core tests (``core_live_server``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.framework.core_live_server import CoreServer, serve
from tests.framework.pg_server import postgres_server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'embervm.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreServer]:
    data = tmp_path_factory.mktemp("core-api")
    with serve(data, f"sqlite+aiosqlite:///{data / 'embervm.db'}") as server:
        yield server

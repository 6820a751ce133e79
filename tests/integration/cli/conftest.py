"""The CLI against a real API server (real core and store, fake runtime behind core's seams)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from core_live_server import CoreServer, serve


@pytest.fixture(scope="module")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreServer]:
    data = tmp_path_factory.mktemp("cli-data")
    with serve(data, f"sqlite+aiosqlite:///{data / 'embervm.db'}") as server:
        yield server

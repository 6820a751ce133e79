"""The CLI against a real API server (real core and store, fake runtime behind core's seams),
one per session, and an image built on it that the tests share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.framework.cli_harness import FollowingAppLogs, as_json, cli
from tests.framework.core_live_server import CoreServer, serve


@pytest.fixture(scope="session")
def cli_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreServer]:
    data = tmp_path_factory.mktemp("cli-data")
    with serve(
        data, f"sqlite+aiosqlite:///{data / 'embervm.db'}", app_logs=FollowingAppLogs(logs={})
    ) as server:
        yield server


@pytest.fixture(scope="session")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build folder with a file its .dockerignore keeps out of the zip."""
    app = tmp_path_factory.mktemp("app")
    (app / "Dockerfile").write_text(
        "FROM embervm/debian12\nCOPY app.py /app/\nCMD python3 /app/app.py\n"
    )
    (app / "app.py").write_text("print('hello')\n")
    (app / "secret.txt").write_text("not for the image\n")
    (app / "cache").mkdir()
    (app / "cache" / "big.bin").write_bytes(b"\0" * 1024)
    (app / ".dockerignore").write_text("secret.txt\ncache/\n")
    return app


@pytest.fixture(scope="session")
def image(cli_server: CoreServer, app_dir: Path) -> dict[str, Any]:
    """Image ``web`` version 1, built with ``images create --follow --output json``."""
    assert cli_server.build_logs is not None
    cli_server.build_logs.logs[("web", "1")] = [  # type: ignore[index]
        json.dumps(
            {
                "ts": "2026-11-22T00:00:00Z",
                "stream": "build",
                "step": "1/2",
                "message": "COPY app.py /app/",
            }
        ),
        json.dumps({"ts": "2026-11-22T00:00:01Z", "stream": "end", "message": "SUCCESSFUL"}),
    ]
    done = cli(
        cli_server,
        "images",
        "create",
        str(app_dir),
        "--name",
        "web",
        "--follow",
        "--output",
        "json",
    )
    return dict(as_json(done))

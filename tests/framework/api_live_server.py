"""A real uvicorn server on 127.0.0.1:<free port> running the API over a fake core.

The server runs in a thread of the test process (so tests can program the fake and move the
server's clock); clients reach it over real TCP: boto3, the AWS CLI, httpx.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from tests.framework.fake_api import FakeOperations

from embervm.api import CredentialStore, create_api_app
from embervm.api.credentials import Credential
from embervm.config import Settings


class ServerClock:
    """The server's notion of now: real time plus an offset a test may set."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class LiveApi:
    url: str
    data_dir: Path
    credential: Credential
    store: CredentialStore
    operations: FakeOperations
    clock: ServerClock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    data_dir = tmp_path_factory.mktemp("embervm-api")
    store = CredentialStore(data_dir / "credentials")
    credential = store.ensure()
    operations = FakeOperations()
    clock = ServerClock()
    app = create_api_app(
        operations,
        store,
        settings=Settings(data_dir=data_dir),
        clock=clock,
        check_outputs=True,
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveApi(f"http://127.0.0.1:{port}", data_dir, credential, store, operations, clock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)

"""The control API over the REAL core and store, on uvicorn at 127.0.0.1:<free port>.

Only the runtime seams are fakes (``tests.framework.fake_core``: no VMs, no builds): everything a
client sees — routing, validation, SigV4, state machine, admission, idempotency, pagination,
persistence — is the production code. The server runs its own event loop in a thread; a test
may stop it and start a new one on the same database (a restart).
"""

from __future__ import annotations

import asyncio
import configparser
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import uvicorn
from botocore.config import Config
from tests.framework.fake_core import FakeAppLogs, FakeBuilder, FakeBuildLogs, FakeHost, FakeTokens

from embervm.api import CredentialStore, create_api_app
from embervm.api.extensions import extension_routes
from embervm.blobs.uploads import UploadArea
from embervm.config import Settings
from embervm.core import CoreLimits, Operations
from embervm.store import open_repository

REGION = "us-east-1"
ACCOUNT = "123456789012"
BASE = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian12"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/build"
CONNECTOR = f"arn:aws:lambda:{REGION}:aws:network-connector:aws-network-connector:{{}}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class CoreServer:
    data_dir: Path
    database_url: str
    limits: CoreLimits = field(default_factory=lambda: CoreLimits(rate_limits={}))
    port: int = 0
    ops: Operations | None = None
    builder: FakeBuilder | None = None  # the fakes of the running server, for tests to program
    build_logs: FakeBuildLogs | None = None
    app_logs: FakeAppLogs | None = None
    _thread: threading.Thread | None = None
    _server: uvicorn.Server | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: list[BaseException] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = self.port or free_port()
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="core-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the API did not start")
        if self._error:
            raise self._error[0]

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start() or the test
            self._error.append(exc)
            self._ready.set()

    async def _serve(self) -> None:
        settings = Settings(data_dir=self.data_dir, region=REGION, account_id=ACCOUNT,
                            database_url=self.database_url)  # fmt: skip
        repo = await open_repository(settings.effective_database_url)
        self.builder = FakeBuilder(settings.images_dir)
        self.build_logs = self.build_logs or FakeBuildLogs(logs={})  # a test's own, if given
        self.app_logs = self.app_logs or FakeAppLogs(logs={})
        ops = Operations(
            settings=settings, repository=repo, host=FakeHost(), builder=self.builder,
            tokens=FakeTokens(), limits=self.limits, build_logs=self.build_logs,
            app_logs=self.app_logs,
        )  # fmt: skip
        await ops.start()
        self.ops = ops
        credentials = CredentialStore(settings.credentials_file)
        credentials.ensure()
        routes, streamed = extension_routes(ops, UploadArea(settings.uploads_dir))
        app = create_api_app(ops, credentials, settings=settings, extra_routes=routes,
                             streamed_paths=streamed, check_outputs=True)  # fmt: skip
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                               log_level="warning", lifespan="off"))  # fmt: skip
        self._server = server
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.01)
        self._ready.set()
        try:
            await serving
        finally:
            await ops.stop()
            await repo.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._server = None
        self._thread = None
        self.ops = None

    def credentials(self) -> tuple[str, str]:
        parser = configparser.ConfigParser()
        parser.read(self.data_dir / "credentials")
        return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]

    def client(self) -> Any:
        key, secret = self.credentials()
        return boto3.client(
            "lambda-microvms", endpoint_url=self.url, region_name=REGION,
            aws_access_key_id=key, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}, max_pool_connections=64),
        )  # fmt: skip


@contextmanager
def serve(data_dir: Path, database_url: str, **kw: Any) -> Iterator[CoreServer]:
    server = CoreServer(data_dir, database_url, **kw)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait(fetch: Any, done: Any, what: str, timeout: float = 30.0) -> Any:
    """``fetch()`` again until ``done`` says yes (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value}"
        time.sleep(0.05)


def image(client: Any, name: str, **extra: Any) -> dict[str, Any]:
    """An image created through ``client``, once its first build has ended."""
    client.create_microvm_image(name=name, baseImageArn=BASE, buildRoleArn=ROLE,
                                codeArtifact={"uri": "file:///tmp/app.zip"}, **extra)  # fmt: skip
    return dict(wait(lambda: client.get_microvm_image(imageIdentifier=name),
                     lambda i: i["state"] != "CREATING", f"image {name}"))  # fmt: skip

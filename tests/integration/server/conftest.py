"""One real server per test session, with the example image built once."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from tests.framework.integration_cache import test_cache_dir
from tests.framework.server_harness import (
    REPO,
    S3_CREDENTIALS,
    LiveServer,
    build_image,
    build_image_with_aws_cli,
    free_port,
)

from embervm.guest.artifacts import GuestArtifacts


def kill_vmms_of(data_dir: Path) -> None:
    """Kill the QEMU processes a test server left running (they outlive the server by design)."""
    needle = str(data_dir).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (
                    b"qemu-system" in (proc / "cmdline").read_bytes()
                    and needle in (proc / "cmdline").read_bytes()
                ):
                    os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API (moto's HTTP server) on 127.0.0.1, for s3:// code artifacts."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_server(
    guest_artifacts: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str
) -> Iterator[LiveServer]:
    """``embervm server`` on free ports; artifacts and build layers from the test cache."""
    data_dir = tmp_path_factory.mktemp("server-data")
    cache = test_cache_dir()
    (data_dir / "artifacts").symlink_to(cache / "artifacts")
    server = LiveServer(
        data_dir,
        free_port(),
        free_port(),
        free_port(),
        extra_args=["--s3-endpoint-url", s3_endpoint],
        extra_env=S3_CREDENTIALS,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        kill_vmms_of(data_dir)  # a stopped server leaves its running VMs for the next start


@pytest.fixture(scope="session")
def flask_image(live_server: LiveServer) -> dict[str, Any]:
    source = REPO / "examples" / "flask-counter"
    image = build_image_with_aws_cli(live_server, "flask-counter", source)
    assert image["state"] == "CREATED", image
    return image


@pytest.fixture(scope="session")
def grpc_ws_image(live_server: LiveServer) -> dict[str, Any]:
    image = build_image(live_server, "grpc-ws", REPO / "examples" / "grpc-websocket")
    assert image["state"] == "CREATED", image
    return image

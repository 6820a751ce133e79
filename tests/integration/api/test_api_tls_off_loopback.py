"""The control API off loopback speaks TLS with a certificate of the local CA, and boto3 talks
to it with that CA as its bundle (A7). "Off loopback" for real: the API listens on
192.0.2.1 (TEST-NET-1) on a veth pair inside a network namespace the test creates; the
server's thread and the client's thread enter that namespace (``setns`` is per thread), so
nothing is ever reachable from outside this machine."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from botocore.config import Config
from tests.framework.fake_api import FakeOperations

from embervm.api import CredentialStore, create_api_app
from embervm.config import Settings
from embervm.server.api_listener import serve_api

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
    ),
]

ADDRESS = "192.0.2.1"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"embervm-api-{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", name, "addr", "add", f"{ADDRESS}/24", "dev", "v0")
        for link in ("v0", "v1"):
            _ip("-n", name, "link", "set", link, "up")
        yield name
    finally:
        _ip("netns", "del", name)


def _enter(name: str) -> None:
    """Move the calling thread (only it) into the namespace ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def _in_netns(name: str, work: Callable[[], T]) -> T:
    """``work()`` on a thread of its own inside the namespace."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            _enter(name)
            result["value"] = work()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(90)
    if "error" in result:
        raise result["error"]
    value: T = result["value"]
    return value


def test_an_api_off_loopback_serves_tls_that_boto3_verifies_with_the_local_ca(
    netns: str, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path, api_listen=ADDRESS, api_port=0)
    store = CredentialStore(settings.credentials_file)
    credential = store.ensure()
    started = threading.Event()
    stop = threading.Event()
    url: list[str] = []

    def serve() -> None:
        async def main() -> None:
            async with contextlib.AsyncExitStack() as stack:
                app = create_api_app(FakeOperations(), store, settings=settings)
                url.append(await serve_api(stack, settings, app))
                started.set()
                await asyncio.to_thread(stop.wait)

        asyncio.run(main())

    server = threading.Thread(target=lambda: _in_netns(netns, serve))
    server.start()
    try:
        assert started.wait(60), "the API did not start"
        assert url[0].startswith(f"https://{ADDRESS}:")

        def list_microvms(verify: str | bool) -> Any:
            client = boto3.client(
                "lambda-microvms", endpoint_url=url[0], region_name="us-east-1",
                aws_access_key_id=credential.access_key_id,
                aws_secret_access_key=credential.secret_access_key, verify=verify,
                config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=10),
            )  # fmt: skip
            return client.list_microvms()

        ca = str(tmp_path / "tls" / "ca.pem")
        answer = _in_netns(netns, lambda: list_microvms(ca))
        assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200

        def plain_http() -> bytes:
            port = int(url[0].rsplit(":", 1)[1])
            with socket.create_connection((ADDRESS, port), timeout=10) as sock:
                sock.sendall(b"GET /ping HTTP/1.1\r\nHost: api\r\n\r\n")
                return sock.recv(100)

        assert not _in_netns(netns, plain_http).startswith(b"HTTP/1.1 200")  # TLS only

        def untrusted() -> None:
            context = ssl.create_default_context()  # the system's CAs: not ours
            port = int(url[0].rsplit(":", 1)[1])
            with (
                socket.create_connection((ADDRESS, port), timeout=10) as sock,
                context.wrap_socket(sock, server_hostname=ADDRESS),
            ):
                pass

        with pytest.raises(ssl.SSLCertVerificationError):
            _in_netns(netns, untrusted)
    finally:
        stop.set()
        server.join(30)

"""The control API's listener over real loopback sockets (A7): what a client without
credentials can make it hold, where it listens, and TLS when asked."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from tests.framework.fake_api import FakeOperations

import embervm.server.api_listener as listener
from embervm.api import CredentialStore, create_api_app
from embervm.config import Settings
from embervm.proxy.tls import ensure_tls
from embervm.server.api_listener import MAX_HEAD_BYTES, BoundedH11Protocol, serve_api

pytestmark = pytest.mark.timeout(60)
LINE = b"X-Pad: " + b"a" * 1017 + b"\r\n"  # 1 KiB


class QuickHeadTimeout(BoundedH11Protocol):
    head_timeout = 0.3


async def _serve(stack: contextlib.AsyncExitStack, settings: Settings) -> str:
    store = CredentialStore(settings.credentials_file)
    store.ensure()
    app = create_api_app(FakeOperations(), store, settings=settings)
    return await serve_api(stack, settings, app, protocol=QuickHeadTimeout)


@pytest.fixture
async def api_url(tmp_path: Path) -> AsyncIterator[str]:
    async with contextlib.AsyncExitStack() as stack:
        yield await _serve(stack, Settings(data_dir=tmp_path, api_port=0))


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host.strip("[]"), int(port)


async def test_a_head_longer_than_the_limit_is_refused_after_at_most_the_limit(
    api_url: str,
) -> None:
    # A7: httptools took 19 MiB of header lines without complaint.
    reader, writer = await asyncio.open_connection(*_address(api_url))
    answer = asyncio.create_task(reader.read())
    writer.write(b"GET /ping HTTP/1.1\r\nHost: api\r\n")
    sent = 0
    with contextlib.suppress(ConnectionError):
        while not answer.done() and sent < 4 * 1024 * 1024:
            writer.write(LINE)
            await writer.drain()
            sent += len(LINE)
            await asyncio.sleep(0.001)  # let the server read what arrived
    head = await asyncio.wait_for(answer, 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert sent <= MAX_HEAD_BYTES + 16 * len(LINE)  # what was in flight when it answered


@pytest.mark.parametrize("after_a_request", [False, True])
async def test_a_head_trickled_line_by_line_is_cut_off(api_url: str, after_a_request: bool) -> None:
    # A7: no timer ran before the first response: a slow head held its connection forever.
    reader, writer = await asyncio.open_connection(*_address(api_url))
    if after_a_request:  # keep-alive: the next head gets its own deadline
        writer.write(b"GET /ping HTTP/1.1\r\nHost: api\r\n\r\n")
        assert (await reader.readuntil(b"{}")).startswith(b"HTTP/1.1 200")
    answer = asyncio.create_task(reader.read())
    writer.write(b"GET /ping HTTP/1.1\r\nHost: api\r\n")
    sent = 0
    with contextlib.suppress(ConnectionError):
        for _ in range(200):  # 10 s at most: 200 lines of 1 KiB, under the size limit's reach
            if answer.done():
                break
            writer.write(LINE[:100] + b"\r\n")
            await writer.drain()
            sent += 102
            await asyncio.sleep(0.05)
    assert answer.done(), "the connection was still open"
    assert await answer == b""  # closed, without an answer
    assert sent < MAX_HEAD_BYTES
    writer.close()


async def test_connections_beyond_the_limit_get_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "MAX_CONNECTIONS", 3)
    async with contextlib.AsyncExitStack() as stack:
        address = _address(await _serve(stack, Settings(data_dir=tmp_path, api_port=0)))
        idle = [await asyncio.open_connection(*address) for _ in range(2)]
        await asyncio.sleep(0.05)  # the server has accepted them
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: api\r\n\r\n")
        status = await reader.readline()
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
    assert status.startswith(b"HTTP/1.1 503")


async def test_listening_on_every_address_for_the_proxy_leaves_the_api_on_loopback(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, listen_host="0.0.0.0", api_port=0)
    assert settings.api_host == "127.0.0.1"
    async with contextlib.AsyncExitStack() as stack:
        url = await _serve(stack, settings)
    assert url.startswith("http://127.0.0.1:")


def test_the_api_follows_a_loopback_listen_address_and_speaks_tls_elsewhere() -> None:
    assert Settings(listen_host="127.0.0.2").api_host == "127.0.0.2"  # old scripts keep working
    assert not Settings(listen_host="127.0.0.2").api_tls
    assert Settings(listen_host="::1").api_host == "::1"
    exposed = Settings(listen_host="0.0.0.0", api_listen="0.0.0.0")
    assert exposed.api_host == "0.0.0.0"
    assert exposed.api_tls
    assert Settings(api_listen="192.0.2.1").api_tls
    assert Settings(api_listen="api.example.test").api_tls  # a name may resolve anywhere


async def test_an_api_with_a_certificate_speaks_tls_to_boto3(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "operator", "corp.test")  # any certificate for 127.0.0.1
    settings = Settings(
        data_dir=tmp_path / "data", api_port=0, api_tls_cert=files.cert, api_tls_key=files.key
    )
    async with contextlib.AsyncExitStack() as stack:
        url = await _serve(stack, settings)
        credential = CredentialStore(settings.credentials_file).ensure()
        assert url.startswith("https://127.0.0.1:")

        def list_microvms() -> object:
            client = boto3.client(
                "lambda-microvms", endpoint_url=url, region_name="us-east-1",
                aws_access_key_id=credential.access_key_id,
                aws_secret_access_key=credential.secret_access_key, verify=str(files.ca),
                config=Config(retries={"max_attempts": 1}),
            )  # fmt: skip
            return client.list_microvms()

        answer = await asyncio.to_thread(list_microvms)
    assert isinstance(answer, dict)
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200


async def test_the_cli_trusts_the_local_ca_of_an_https_api(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls", "microvm.localhost")  # DATA_DIR/tls/ca.pem signs it
    settings = Settings(
        data_dir=tmp_path, api_port=0, api_tls_cert=files.cert, api_tls_key=files.key
    )

    async def cli(*env: tuple[str, str]) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "embervm.cli", "--data-dir", str(tmp_path),
            "--endpoint-url", url, "get", "mvm-00000000000000000000", "-o", "json",
            env={**os.environ, **dict(env)}, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        return await asyncio.wait_for(process.wait(), 60)

    async with contextlib.AsyncExitStack() as stack:
        url = await _serve(stack, settings)
        assert await cli() == 0
        other = ensure_tls(tmp_path / "other", "microvm.localhost").ca
        assert await cli(("EMBERVM_CA_BUNDLE", str(other))) != 0  # another CA: refused

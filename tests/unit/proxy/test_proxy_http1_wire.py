"""HTTP/1.1 framing at the proxy, byte by byte over raw sockets: ambiguous or oversized heads
are refused before any app sees them (request smuggling), pipelining, HEAD, 100-continue,
chunked bodies and trailers both ways."""

from __future__ import annotations

import asyncio

import pytest
from tests.framework.proxy_unit_harness import App, Rig, until

pytestmark = pytest.mark.timeout(60)


async def exchange(rig: Rig, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    try:
        writer.write(data)
        if not until_close:
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


def head(rig: Rig, app: App, first: str, *extra: str) -> bytes:
    fields = [f"{k}: {v}" for k, v in rig.headers(app.port).items()]
    return ("\r\n".join([first, *fields, *extra]) + "\r\n\r\n").encode()


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (("Content-Length: 5", "Transfer-Encoding: chunked"), b"400"),
        (("Content-Length: 5", "Content-Length: 6"), b"400"),
        (("Transfer-Encoding: gzip, chunked",), b"400"),
        (("X-Folded: a", " b"), b"400"),
        (("Bad Name: x",), b"400"),
        (("Content-Length: -1",), b"400"),
        (("X-Big: " + "a" * 70_000,), b"431"),
    ],
)
async def test_ambiguous_or_oversized_heads_never_reach_the_app(
    rig: Rig, app: App, extra: tuple[str, ...], status: bytes
) -> None:
    answer = await exchange(rig, head(rig, app, "POST /headers HTTP/1.1", *extra) + b"hello")
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert app.state.hits == 0


async def test_pipelined_requests_are_answered_in_order(rig: Rig, app: App) -> None:
    one = head(rig, app, "GET /headers?n=1 HTTP/1.1")
    two = head(rig, app, "HEAD /headers?n=2 HTTP/1.1")
    three = head(rig, app, "GET /headers?n=3 HTTP/1.1", "Connection: close")
    answer = await exchange(rig, one + two + three)
    assert answer.count(b"HTTP/1.1 200") == 3
    assert answer.count(b'"path":"/headers"') == 2  # the HEAD answer has no body
    assert app.state.hits == 3


async def test_chunked_request_body_with_trailers_streams_back(rig: Rig, app: App) -> None:
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"
    request = head(rig, app, "POST /echo HTTP/1.1", "Transfer-Encoding: chunked",
                   "Connection: close") + body  # fmt: skip
    answer = await exchange(rig, request)
    status, _, rest = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in status.lower()
    assert b"hello" in rest
    assert b" world" in rest
    assert rest.endswith(b"0\r\n\r\n")


async def test_expect_100_continue_is_relayed(rig: Rig, app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    try:
        writer.write(head(rig, app, "POST /echo HTTP/1.1", "Content-Length: 4",
                          "Expect: 100-continue", "Connection: close"))  # fmt: skip
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b"ping")
        answer = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"4\r\nping\r\n0\r\n\r\n")


async def test_http10_client_gets_its_answer_and_the_connection_ends(rig: Rig, app: App) -> None:
    answer = await exchange(rig, head(rig, app, "GET /headers HTTP/1.0"))
    assert b" 200 " in answer.split(b"\r\n", 1)[0]
    assert b'"http_version":"1.0"' in answer


async def test_a_client_that_stops_mid_body_does_not_leave_the_app_waiting(
    rig: Rig, app: App
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    writer.write(head(rig, app, "POST /echo HTTP/1.1", "Content-Length: 100") + b"part")
    await asyncio.wait_for(app.state.first_chunk.wait(), 10)
    writer.close()
    await writer.wait_closed()
    await until(lambda: not rig.proxy.admission._open)  # the app connection is released

"""What RFC 9112 and RFC 9110 leave to a careful intermediary (audit A15, A18): heads whose
routing or framing two parsers could read differently are refused on every HTTP/1.1 path (the
relay, upgrades, ``/shell``); what reaches the app has no connection-specific field and its
framing in one canonical form; a ``Set-Cookie`` loses its ``Domain`` on the way back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tests.framework.proxy_unit_harness import DOMAIN, VM, Rig

from embervm.proxy.h1.wire import (
    CHUNKED,
    BadMessage,
    forwarded_fields,
    host_only_cookie,
    host_only_cookies,
    parse_request,
    parse_response,
    request_framing,
    response_summary,
)
from embervm.proxy.limits import HOP_BY_HOP

pytestmark = pytest.mark.timeout(60)


def request(*fields: bytes, first: bytes = b"POST / HTTP/1.1") -> bytes:
    return b"\r\n".join([first, *fields]) + b"\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        request(b"Host: a.example", b"Host: b.example"),
        request(b"Host: a.example", b"host: a.example"),
        request(b"Host: a", b"Transfer-Encoding: chunked", first=b"POST / HTTP/1.0"),
        request(b"Host: a", b"Transfer-Encoding: identity", first=b"POST / HTTP/1.0"),
        request(b"Host: a", first=b"GET http://other.example/ HTTP/1.1"),
        request(b"Host: a", first=b"CONNECT other.example:443 HTTP/1.1"),
        request(b"Host: a", first=b"GET * HTTP/1.1"),
        request(b"Host: a", first=b"GET x HTTP/1.1"),
    ],
)
def test_heads_two_parsers_could_read_differently_are_refused(raw: bytes) -> None:
    with pytest.raises(BadMessage) as refused:
        request_framing(parse_request(raw))
    assert refused.value.status == 400


def test_options_asterisk_is_a_request_target() -> None:
    assert parse_request(request(b"Host: a", first=b"OPTIONS * HTTP/1.1")).target == b"*"


def test_connection_specific_fields_never_reach_the_app() -> None:
    head = parse_request(request(
        b"Host: a", b"Connection: keep-alive, X-Secret, Content-Length, Host", b"X-Secret: 1",
        b"Keep-Alive: timeout=5", b"Proxy-Authorization: Basic eA==", b"Proxy-Connection: x",
        b"TE: trailers", b"Upgrade: websocket", b"Content-Length: 5, 5", b"X-Kept: yes",
    ))  # fmt: skip
    fields = forwarded_fields(head)
    assert fields == [(b"host", b"a"), (b"content-length", b"5"), (b"x-kept", b"yes")]
    assert not HOP_BY_HOP & {name for name, _ in fields}


def test_framing_reaches_the_app_in_its_canonical_form() -> None:
    head = parse_request(request(b"Host: a", b"Transfer-Encoding: ,Chunked", b"Transfer-Encoding:"))
    assert request_framing(head) == CHUNKED
    assert forwarded_fields(head) == [(b"host", b"a"), (b"transfer-encoding", b"chunked")]


def test_an_upgrade_keeps_its_upgrade_field_and_says_so_in_connection() -> None:
    head = parse_request(request(b"Host: a", b"Connection: Upgrade, Keep-Alive, X-Hop",
                                 b"Upgrade: websocket", b"X-Hop: 1"))  # fmt: skip
    assert forwarded_fields(head, upgrade=True) == [
        (b"host", b"a"),
        (b"upgrade", b"websocket"),
        (b"connection", b"upgrade"),
    ]


@pytest.mark.parametrize(
    ("value", "host_only"),
    [
        (b"s=1; Domain=microvm.localhost; Path=/", b"s=1; Path=/"),
        (b"s=1;domain=.microvm.localhost;Secure", b"s=1;Secure"),
        (b"s=1; DOMAIN = x; HttpOnly; domain=y", b"s=1; HttpOnly"),
        (b"s=1; Path=/domain", b"s=1; Path=/domain"),
        (b"domain=1; Path=/", b"domain=1; Path=/"),
    ],
)
def test_set_cookie_loses_its_domain(value: bytes, host_only: bytes) -> None:
    assert host_only_cookie(value) == host_only


def test_a_head_without_set_cookie_passes_as_it_is() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Domain: domain=a\r\n\r\n"
    assert host_only_cookies(raw) is raw


@pytest.mark.parametrize("name", [b"Set-Cookie", b"SET-COOKIE", b"set-cookie", b"sEt-CoOkIe"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_set_cookie_in_any_case_anywhere_in_the_head_loses_its_domain(
    name: bytes, position: int
) -> None:
    fields = [b"Content-Length: 0", b"X-A: b"]
    fields.insert(position, name + b": s=1; Domain=" + DOMAIN.encode())
    raw = b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    assert parse_response(host_only_cookies(raw)).get(b"set-cookie") == b"s=1"


def test_the_summary_reads_framing_fields_one_right_after_another_in_any_case() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nCONNECTION: close\r\ncontent-length: 5\r\n"
           b"Content-Length: 5\r\n\r\n")  # fmt: skip
    assert response_summary(raw, b"GET") == (200, 5, False)
    with pytest.raises(BadMessage):
        response_summary(raw.replace(b"Content-Length: 5", b"CONTENT-LENGTH: 6"), b"GET")
    with pytest.raises(BadMessage):
        response_summary(raw.replace(b"Content-Length: 5", b"tRaNsFeR-eNcOdInG: chunked"), b"GET")


# -- through the proxy, over real sockets ---------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def recording_app(answer: bytes) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An app that records every request head it reads (and the body its Content-Length
    announces) and answers each with ``answer``."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = parse_request(head).get(b"content-length")
                seen.append(head + await reader.readexactly(int(length or 0)))
                writer.write(answer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def send(rig: Rig, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


def head(rig: Rig, port: int, first: str, *extra: str, kind: str = "endpoint") -> bytes:
    token = rig.token(kind=kind)
    fields = [f"Host: {VM}.{DOMAIN}", f"X-aws-proxy-auth: {token}", f"X-aws-proxy-port: {port}"]
    return ("\r\n".join([first, *fields, *extra]) + "\r\n\r\n").encode()


WEBSOCKET = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")  # fmt: skip


@pytest.mark.parametrize(
    ("first", "extra"),
    [
        ("GET / HTTP/1.1", (f"Host: other.{DOMAIN}",)),  # the relay
        ("GET /ws HTTP/1.1", (*WEBSOCKET, f"Host: other.{DOMAIN}")),  # an upgrade
        ("GET http://other.example/ HTTP/1.1", ()),
        ("POST / HTTP/1.0", ("Transfer-Encoding: chunked",)),
    ],
)
async def test_every_http1_path_refuses_ambiguous_heads_before_the_app(
    rig: Rig, first: str, extra: tuple[str, ...]
) -> None:
    async with recording_app(OK) as (port, seen):
        answer = await send(rig, head(rig, port, first, *extra))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert seen == []


async def test_a_shell_with_two_hosts_is_refused(rig: Rig) -> None:
    raw = head(
        rig,
        8022,
        "GET /shell HTTP/1.1",
        *WEBSOCKET,
        "Sec-WebSocket-Protocol: lambda-microvms",
        f"Host: other.{DOMAIN}",
        kind="shell",
    )
    answer = await send(rig, raw)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert rig.shells.opened == []


async def test_the_relay_sends_the_app_canonical_framing_and_no_hop_fields(rig: Rig) -> None:
    async with recording_app(OK) as (port, seen):
        answer = await send(rig, head(
            rig, port, "POST /a HTTP/1.1", "Connection: close, X-Secret", "X-Secret: 1",
            "Keep-Alive: timeout=5", "Proxy-Authorization: Basic eA==", "TE: trailers",
            "Content-Length: 5, 5",
        ) + b"hello")  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 200 ")
    [got] = seen
    fields = parse_request(got.split(b"\r\n\r\n")[0] + b"\r\n\r\n").fields
    names = {name for name, _ in fields}
    assert not names & (HOP_BY_HOP | {b"x-secret", b"x-aws-proxy-auth"})
    assert (b"content-length", b"5") in fields
    assert got.endswith(b"\r\n\r\nhello")


async def test_app_cookies_come_back_host_only(rig: Rig) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Domain=" + DOMAIN.encode()
              + b"; Path=/\r\nContent-Length: 2\r\n\r\nok")  # fmt: skip
    async with recording_app(answer) as (port, _):
        got = await send(rig, head(rig, port, "GET / HTTP/1.1", "Connection: close"))
    assert b"set-cookie: a=1; Path=/\r\n" in got
    assert b"domain" not in got.lower()

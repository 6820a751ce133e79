"""HTTP/2 client connections through the real proxy against what a hostile client (or a client
with a token plus a hostile app) can make the session hold: refusals, unauthenticated
connections, answers held for clients that grant no window (audit A2, A8, B7)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.events
import h2.settings
import pytest
from tests.framework.proxy_h2_peers import Client, h2c_app
from tests.framework.proxy_unit_harness import HOST, App, Rig

from embervm.proxy.h2 import session as h2_session
from embervm.proxy.h2.relay_h2 import MAX_H2_TARGETS

pytestmark = pytest.mark.timeout(60)

NO_WINDOW = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}


async def test_a_refusal_ends_its_stream_for_a_client_that_grants_no_window(rig: Rig) -> None:
    client = await Client.open(rig, NO_WINDOW)
    try:
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", HOST.encode()),
                   (b":path", b"/"), (b"x-aws-proxy-auth", b"not-a-token")]  # fmt: skip
        for stream_id in range(1, 64, 2):
            client.conn.send_headers(stream_id, headers, end_stream=True)
        client.flush()
        ended: set[int] = set()
        while len(ended) < 32:
            events = await client.read(ack=False)
            assert not client.closed
            ended |= {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}
        statuses = [dict(e.headers)[b":status"] for e in client.events
                    if isinstance(e, h2.events.ResponseReceived)]  # fmt: skip
        assert statuses == [b"403"] * 32
    finally:
        await client.close()


@pytest.fixture
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> float:
    """The first-request deadline and the session's tick, shortened alike (30 s and 5 s)."""
    monkeypatch.setattr(h2_session, "FIRST_REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(h2_session, "TICK", 0.05)
    return 0.3


def refused_request(client: Client) -> None:
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", HOST.encode()),
               (b":path", b"/")]  # fmt: skip
    client.conn.send_headers(client.conn.get_next_available_stream_id(), headers, end_stream=True)
    client.flush()


async def test_a_connection_without_a_valid_token_ends_at_the_first_request_deadline(
    rig: Rig, short_deadlines: float
) -> None:
    client = await Client.open(rig)
    try:
        terminated: list[h2.events.ConnectionTerminated] = []
        while not terminated:  # busy all along, but never with a valid token
            refused_request(client)
            events = await client.read()
            assert not client.closed, "closed without GOAWAY"
            terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert terminated[0].error_code == 0
        try:
            after = await client.read()
        except ConnectionResetError:  # a request of ours was still unread when it closed: the
            after = []  # kernel answers RST rather than FIN; either way, closed after GOAWAY
        assert after == []  # then closed
    finally:
        await client.close()


async def test_a_connection_with_a_valid_token_outlives_the_first_request_deadline(
    rig: Rig, app: App, short_deadlines: float
) -> None:
    client = await Client.open(rig)
    try:
        status, _ = await client.answer(client.request(rig, app.port))
        assert status == 200
        await asyncio.sleep(3 * short_deadlines)  # idle, but past the deadline it had
        status, _ = await client.answer(client.request(rig, app.port))
        assert status == 200
    finally:
        await client.close()


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[h2_session.ClientSession]:
    """Every client session the proxy makes, to look at what it holds."""
    made: list[h2_session.ClientSession] = []
    init = h2_session.ClientSession.__init__

    def recorded(self: h2_session.ClientSession, *args: Any) -> None:
        init(self, *args)
        made.append(self)

    monkeypatch.setattr(h2_session.ClientSession, "__init__", recorded)
    return made


@pytest.fixture
async def endless_app() -> AsyncIterator[int]:
    """An app answering each request with a body that never ends, as fast as it is taken."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n")
            while True:
                writer.write(b"z" * 65536)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def settled(measure: Callable[[], int]) -> int:
    """``measure`` once it stopped changing (what a stalled relay holds)."""
    last, same = -1, 0
    while same < 5:
        await asyncio.sleep(0.1)
        now = measure()
        same = same + 1 if now == last else 0
        last = now
    return last


async def test_what_a_client_that_grants_no_window_pins_is_bounded(
    rig: Rig, sessions: list[h2_session.ClientSession], endless_app: int
) -> None:
    client = await Client.open(rig, NO_WINDOW)  # and the connection's 64 KiB, never renewed
    try:
        for _ in range(32):
            client.request(rig, endless_app, "/")
        await client.read(ack=False)
        (session,) = sessions
        held = await settled(lambda: session.engine.held_bytes)
        assert (
            held <= h2_session.HELD_BUDGET + 256 * 1024
        )  # was one app read per stream: 32 of them
        assert session.client_full
    finally:
        await client.close()


async def test_a_client_connection_reaches_a_bounded_number_of_h2c_apps(rig: Rig) -> None:
    servers = [await asyncio.start_server(h2c_app, "127.0.0.1", 0)
               for _ in range(MAX_H2_TARGETS + 1)]  # fmt: skip
    client = await Client.open(rig)
    try:
        statuses = []
        for server in servers:
            port = server.sockets[0].getsockname()[1]
            stream_id = client.request(rig, port, "/", (b"x-aws-proxy-force-h2", b"true"))
            statuses.append((await client.answer(stream_id))[0])
        assert statuses == [200] * MAX_H2_TARGETS + [429]
    finally:
        await client.close()
        for server in servers:
            server.close()


async def test_a_window_update_flood_after_refusals_ends_the_connection(rig: Rig) -> None:
    client = await Client.open(rig, NO_WINDOW)  # the audit's A2 attack, without a token
    try:
        for _ in range(256):
            refused_request(client)
        for _ in range(16384 // 13):  # 16 KiB of WINDOW_UPDATE(0, +1)
            client.conn.increment_flow_control_window(1)
        client.flush()
        assert await client.goaway_code() == 0xB  # ENHANCE_YOUR_CALM
    finally:
        await client.close()

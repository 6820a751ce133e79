"""HTTP/2 clients through the real proxy to HTTP/1.1 apps: kept app connections and their
accounting, bodies, backpressure from slow readers, resets, broken apps, hostile frames.

The client is h2's (``tests.framework.proxy_h2_peers``: its own header checks off, to send what
a hostile peer would); the apps are the Starlette one of ``tests.framework.proxy_unit_harness``
or small raw ones written here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import h2.events
import h2.settings
import pytest
from tests.framework.proxy_h2_peers import Client
from tests.framework.proxy_unit_harness import HOST, VM, App, Rig, until

pytestmark = pytest.mark.timeout(60)

Headers = list[tuple[bytes, bytes]]
MiB = 1024 * 1024


@pytest.fixture
async def h2client(rig: Rig) -> AsyncIterator[Client]:
    client = await Client.open(rig)
    try:
        yield client
    finally:
        await client.close()


def open_app_connections(rig: Rig) -> int:
    return rig.proxy.admission._open.get(VM, 0)


# -- a raw HTTP/1.1 app whose every move the test decides -------------------------------------


@dataclass
class RawApp:
    port: int
    written: int = 0
    draining: bool = False
    connections: int = 0


Handler = Callable[[RawApp, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_app() -> AsyncIterator[Callable[[Handler], Awaitable[RawApp]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> RawApp:
        state = RawApp(0)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            try:
                await handler(state, reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start
    for server in servers:
        server.close()


async def endless(
    state: RawApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers with a body that never ends, as fast as the proxy takes it."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n")
    chunk = b"z" * 65536
    while True:
        writer.write(chunk)
        state.written += len(chunk)
        state.draining = True
        await writer.drain()
        state.draining = False


async def stalls(state: RawApp) -> int:
    """What the app had written once it stopped making progress (a proxy that buffered
    everything would let it go on for ever)."""
    last = -1
    for _ in range(100):
        await asyncio.sleep(0.1)
        if state.draining and state.written == last:
            return last
        last = state.written
    raise AssertionError(f"the app never stalled ({state.written} bytes written)")


# -- tests --------------------------------------------------------------------------------------


async def keep_alive(
    state: RawApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answers every request with the port the proxy's connection came from; never closes."""
    port = str(writer.get_extra_info("peername")[1]).encode()
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(port), port))


async def test_streams_reuse_kept_app_connections_and_give_them_back(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client
) -> None:
    app = await raw_app(keep_alive)
    ports = set()
    for _ in range(5):
        status, body = await h2client.answer(h2client.request(rig, app.port))
        assert status == 200
        ports.add(body)
    assert len(ports) == 1  # one kept app connection for requests one after another
    assert (app.connections, open_app_connections(rig)) == (1, 1)
    await h2client.close()
    await until(lambda: open_app_connections(rig) == 0)  # closed by the proxy: the app never


async def test_an_answer_that_says_close_does_not_keep_the_app_connection(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client
) -> None:
    async def says_close(
        state: RawApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:  # but keeps the connection open, and would answer again
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    app = await raw_app(says_close)
    for _ in range(2):
        assert await h2client.answer(h2client.request(rig, app.port, "/")) == (200, b"ok")
    assert app.connections == 2
    await until(lambda: open_app_connections(rig) == 0)


async def test_an_answer_before_the_body_ended_does_not_keep_the_app_connection(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client
) -> None:
    app = await raw_app(keep_alive)
    posted = h2client.request(rig, app.port, "/", method=b"POST", end=False)
    h2client.conn.send_data(posted, b"part of a body")
    h2client.flush()
    status, _ = await h2client.answer(posted)
    assert status == 200
    await until(lambda: open_app_connections(rig) == 0)  # it may still wait for the rest
    assert (await h2client.answer(h2client.request(rig, app.port)))[0] == 200
    assert app.connections == 2


async def test_header_injection_never_reaches_the_app(rig: Rig, app: App, h2client: Client) -> None:
    evil = h2client.request(rig, app.port, "/headers", (b"x-evil", b"a\r\nx-injected: 1"))
    assert await h2client.reset_code(evil) == 0x1  # PROTOCOL_ERROR
    assert app.state.hits == 0
    status, body = await h2client.answer(h2client.request(rig, app.port))
    assert status == 200
    assert "x-injected" not in json.dumps(json.loads(body))


async def test_a_body_without_length_goes_chunked_and_cookies_go_as_one_field(
    rig: Rig, app: App, h2client: Client
) -> None:
    stream_id = h2client.request(rig, app.port, "/echo", method=b"POST", end=False)
    h2client.conn.send_data(stream_id, b"first ")
    h2client.conn.send_data(stream_id, b"second", end_stream=True)
    h2client.flush()
    assert await h2client.answer(stream_id) == (200, b"first second")
    cookies = h2client.request(rig, app.port, "/headers", (b"cookie", b"a=1"), (b"cookie", b"b=2"))
    _status, body = await h2client.answer(cookies)
    seen = [value for name, value in json.loads(body)["headers"] if name == "cookie"]
    assert seen == ["a=1; b=2"]


async def test_a_host_field_stands_for_a_missing_authority(
    rig: Rig, app: App, h2client: Client
) -> None:
    headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/headers"),
               (b"host", HOST.encode())]  # fmt: skip
    headers += [(k.encode(), v.encode()) for k, v in rig.headers(app.port).items() if k != "host"]
    h2client.conn.send_headers(1, headers, end_stream=True)
    h2client.flush()
    status, body = await h2client.answer(1)
    assert status == 200
    assert [v for k, v in json.loads(body)["headers"] if k == "host"] == [HOST]


async def test_a_reader_that_grants_no_window_holds_the_app_back(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client
) -> None:
    app = await raw_app(endless)
    stream_id = h2client.request(rig, app.port, "/")
    received = 0
    while received < 65535:  # the default window, never renewed
        for event in await h2client.read(ack=False):
            if isinstance(event, h2.events.DataReceived):
                received += len(event.data)
    assert await stalls(app) < 32 * MiB
    assert received == 65535
    h2client.conn.reset_stream(stream_id)
    h2client.flush()
    await until(lambda: open_app_connections(rig) == 0)  # the app connection is closed


async def test_a_client_that_stops_reading_holds_the_app_back(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]]
) -> None:
    app = await raw_app(endless)
    window = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
    client = await Client.open(rig, {window: 2**31 - 1})
    client.conn.increment_flow_control_window(2**31 - 1 - 65535)
    client.request(rig, app.port, "/")
    try:
        await client.read()  # our settings acknowledged; from here on nothing is read
        assert await stalls(app) < 32 * MiB
    finally:
        await client.close()
    await until(lambda: open_app_connections(rig) == 0)


async def test_the_app_closing_mid_answer_resets_the_stream(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client
) -> None:
    async def cut(
        state: RawApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    app = await raw_app(cut)
    assert await h2client.reset_code(h2client.request(rig, app.port, "/")) == 0x2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", (502, b"The app sent a malformed answer\n")),
        (b"", (502, b"The app closed the connection\n")),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            (201, b"ok"),
        ),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", (200, b"until the end")),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n"
            b"x-trailer: t\r\n\r\n",
            (200, b"abcde"),
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None),
    ],
)
async def test_app_answers_as_they_come(
    rig: Rig, raw_app: Callable[[Handler], Awaitable[RawApp]], h2client: Client,
    answer: bytes, expected: tuple[int, bytes] | None,
) -> None:  # fmt: skip
    async def respond(
        state: RawApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    app = await raw_app(respond)
    stream_id = h2client.request(rig, app.port, "/")
    if expected is None:  # the head went out, then the body broke its framing
        assert await h2client.reset_code(stream_id) == 0x2
    else:
        assert await h2client.answer(stream_id) == expected
    await until(lambda: open_app_connections(rig) == 0)  # none of these connections is kept


async def test_a_malformed_frame_ends_the_connection_with_goaway(
    rig: Rig, app: App, h2client: Client
) -> None:
    await h2client.answer(h2client.request(rig, app.port))
    h2client.writer.write(b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + b"x" * 7)  # PING of 7 bytes
    assert await h2client.goaway_code() == 0x6  # FRAME_SIZE_ERROR
    while not h2client.closed:
        await h2client.read()
    await until(lambda: open_app_connections(rig) == 0)


async def test_rapid_reset_is_cut_off_and_leaves_no_app_connection(
    rig: Rig, app: App, h2client: Client
) -> None:
    for _ in range(2000):
        stream_id = h2client.request(rig, app.port)
        h2client.conn.reset_stream(stream_id)
    h2client.flush()
    assert await h2client.goaway_code() == 0xB  # ENHANCE_YOUR_CALM
    await until(lambda: open_app_connections(rig) == 0)
    assert rig.routes.activity.count(VM) < 2000

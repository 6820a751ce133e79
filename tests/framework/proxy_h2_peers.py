"""HTTP/2 peers of the proxy's unit tests: ``Client``, an h2c connection (h2's, with its own
header checks off, to send what a hostile peer would) to the proxy's plain listener, and
``h2c_app``, an app that speaks only h2c (written with h2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import pytest
from tests.framework.proxy_unit_harness import HOST, Rig, listening_socket


class Client:
    """One h2c connection (prior knowledge) to the proxy's plain listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False,
        )  # fmt: skip
        self.conn = h2.connection.H2Connection(config)
        self.events: list[h2.events.Event] = []
        self.closed = False

    @classmethod
    async def open(cls, rig: Rig, settings: dict[int, int] | None = None) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        if settings:
            client.conn.update_settings(settings)
        client.flush()
        return client

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.writer.write(data)

    def request(self, rig: Rig, port: int, path: str = "/headers", *extra: tuple[bytes, bytes],
                method: bytes = b"GET", end: bool = True) -> int:  # fmt: skip
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":authority", HOST.encode()),
                   (b":path", path.encode())]  # fmt: skip
        headers += [(k.encode(), v.encode()) for k, v in rig.headers(port).items() if k != "host"]
        self.conn.send_headers(stream_id, headers + list(extra), end_stream=end)
        self.flush()
        return stream_id

    async def read(self, *, ack: bool = True) -> list[h2.events.Event]:
        data = await asyncio.wait_for(self.reader.read(65536), 20)
        if not data:
            self.closed = True
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if ack and isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        self.events += events
        return events

    async def answer(self, stream_id: int) -> tuple[int, bytes]:
        """Status and body of a stream's answer (AssertionError if it was reset)."""
        status, body = 0, b""
        while True:
            for event in await self.read():
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream {stream_id} reset: {event.error_code}")
            assert not self.closed, "the proxy closed the connection"

    async def reset_code(self, stream_id: int) -> int:
        while True:
            for event in await self.read():
                if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    return int(event.error_code)
            assert not self.closed, "the proxy closed the connection"

    async def goaway_code(self) -> int:
        while not self.closed:
            for event in await self.read():
                if isinstance(event, h2.events.ConnectionTerminated):
                    return int(event.error_code)
        raise AssertionError("closed without GOAWAY")

    async def close(self) -> None:
        self.writer.close()


async def h2c_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each stream with what it saw (headers, body size), then a trailer."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    heads: dict[int, dict[str, str]] = {}
    sizes: dict[int, int] = {}
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                heads[event.stream_id] = {k.decode(): v.decode() for k, v in event.headers}
                sizes[event.stream_id] = 0
            elif isinstance(event, h2.events.DataReceived):
                sizes[event.stream_id] += len(event.data)
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                sid = event.stream_id
                body = json.dumps({"headers": heads[sid], "size": sizes[sid],
                                   "connection": id(conn)}).encode()  # fmt: skip
                conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json")])
                conn.send_data(sid, body)
                conn.send_headers(sid, [("x-trailer", "yes")], end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


@pytest.fixture
async def h2c_port() -> AsyncIterator[int]:
    """The port of an h2c app (``h2c_app``) on 127.0.0.1, closed after the test."""
    sock = listening_socket()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await h2c_app(reader, writer)

    server = await asyncio.start_server(serve, sock=sock)
    try:
        yield sock.getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()

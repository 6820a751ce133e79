"""Byte plumbing shared by the protocol handlers: bounded reads and two-way splicing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

READ_SIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0
STREAM_LIMIT = 64 * 1024  # a StreamReader's line and head limit (asyncio.start_server's own)


def streams_over(
    transport: asyncio.Transport, data: bytes, eof: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a connection a protocol served until now, starting with the bytes it had
    read and not used (``eof``: the peer had already finished sending)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if data:
        reader.feed_data(data)
    if eof:
        reader.feed_eof()
    transport.resume_reading()  # the protocol before may have paused it
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def open_upstream(
    address: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the guest's port; OSError/TimeoutError when nothing answers."""
    async with asyncio.timeout(CONNECT_TIMEOUT):
        return await asyncio.open_connection(address, port, limit=READ_SIZE)


async def pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_data: Callable[[], None] | None = None,
) -> None:
    """Copy until EOF, waiting for the far side to drain (backpressure), then half-close (or
    close: TLS cannot half-close, and a peer waiting for our close would wait forever)."""
    try:
        while data := await reader.read(READ_SIZE):
            if on_data is not None:
                on_data()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        else:
            writer.close()
    except (ConnectionError, OSError):
        pass


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    on_inbound: Callable[[], None] | None = None,
) -> None:
    """Relay both ways until both directions end (or one side breaks); ``on_inbound`` is
    called for every chunk from ``a`` (the client) to ``b``: that traffic is activity."""
    one = asyncio.create_task(pipe(a[0], b[1], on_inbound))
    two = asyncio.create_task(pipe(b[0], a[1]))
    try:
        await asyncio.gather(one, two)
    finally:
        for task in (one, two):
            task.cancel()


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await writer.wait_closed()

"""Byte plumbing shared by the protocol handlers: bounded reads, two-way splicing, and the
lease that ends a spliced session."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable

from embervm.proxy.limits import CONNECT_TIMEOUT, READ_SIZE, TOKEN_CHECK_INTERVAL

STREAM_LIMIT = 64 * 1024  # a StreamReader's line and head limit (asyncio.start_server's own)


class Ending(enum.StrEnum):
    """Why a lease ended its session (for the log, and a shell's close frame)."""

    EXPIRED = "token expired"
    REVOKED = "token revoked"
    IDLE = "idle"


class SessionLease:
    """How long a spliced session (WebSocket or other upgrade, ``/shell``) may stay open.

    Its token was checked once, at the upgrade; after that the bytes flow with no request to
    check it on. So the lease ends the session at the token's expiry, when ``still_current``
    turns False (the key that sealed it was revoked: asked every ``check_interval`` seconds),
    or after ``idle_timeout`` seconds without a byte either way (``touch``)."""

    def __init__(
        self,
        expires_at: float,
        still_current: Callable[[], bool],
        *,
        idle_timeout: float,
        clock: Callable[[], float] = time.time,
        check_interval: float = TOKEN_CHECK_INTERVAL,
    ) -> None:
        self.expires_at = expires_at
        self.still_current = still_current
        self.idle_timeout = idle_timeout
        self.clock = clock  # the token's (epoch) time; idleness is measured on the loop's
        self.check_interval = check_interval
        self.loop = asyncio.get_running_loop()
        self.last_activity = self.loop.time()

    def touch(self) -> None:
        """A byte went one way or the other."""
        self.last_activity = self.loop.time()

    async def ended(self) -> Ending:
        """Wait until the session must end, and say why."""
        while True:
            to_expiry = self.expires_at - self.clock()
            if to_expiry <= 0:
                return Ending.EXPIRED
            if not self.still_current():
                return Ending.REVOKED
            idle_left = self.last_activity + self.idle_timeout - self.loop.time()
            if idle_left <= 0:
                return Ending.IDLE
            await asyncio.sleep(min(self.check_interval, idle_left, to_expiry))


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
    on_inbound: Callable[[], None],
    lease: SessionLease,
) -> Ending | None:
    """Relay both ways until both directions end (or one side breaks), or until ``lease``
    ends: then its reason is returned and the caller closes both sides. ``on_inbound`` is
    called for every chunk from ``a`` (the client) to ``b``: that traffic is activity."""

    def inbound() -> None:
        on_inbound()
        lease.touch()

    one = asyncio.create_task(pipe(a[0], b[1], inbound))
    two = asyncio.create_task(pipe(b[0], a[1], lease.touch))
    watch = asyncio.create_task(lease.ended())
    pending: set[asyncio.Task[None] | asyncio.Task[Ending]] = {one, two, watch}
    try:
        while not (one.done() and two.done()):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                return watch.result()
        return None
    finally:
        for task in (one, two, watch):
            task.cancel()


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):
            await writer.wait_closed()

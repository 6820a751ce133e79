"""HTTP/1.1 through h11, for the HTTP/2 relay's requests to HTTP/1.1 apps: ``H11Peer`` frames
one side of a connection (events queued as bytes, written by ``flush``: one write per burst),
``H1Upstream`` is a kept-alive connection to an app port."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from embervm.proxy.admission import Target
from embervm.proxy.streams import READ_SIZE

MAX_HEAD = 64 * 1024
RESPONSE_HEAD_TIMEOUT = 300.0


class H11Peer:
    """One side of an HTTP/1.1 connection, framed by h11: events are queued as bytes and
    written by ``flush`` (one write per burst, not one per event)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: type[h11.CLIENT] | type[h11.SERVER],
        initial: bytes = b"",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)
        if initial:
            self.conn.receive_data(initial)
        self._out: list[bytes] = []

    def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self._out.append(data)

    def queued(self) -> int:
        return sum(len(chunk) for chunk in self._out)

    async def flush(self) -> None:
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
        await self.writer.drain()

    async def next_event(
        self,
        timeout: float,  # noqa: ASYNC109 - per phase (head, body), not per call
        before_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        """The next event from the peer; ``before_wait`` runs before blocking on the socket."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if before_wait is not None:
                await before_wait()
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
            self.conn.receive_data(data)


class H1Upstream(H11Peer):
    """One keep-alive HTTP/1.1 connection to an app port."""

    def __init__(
        self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(reader, writer, h11.CLIENT)
        self.target = target

    def reusable(self) -> bool:
        """Both sides finished the last exchange and the app has not hung up since."""
        done = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        return done and not self.reader.at_eof()

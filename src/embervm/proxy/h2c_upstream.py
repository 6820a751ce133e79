"""One h2c connection to an app (the client side) driven by h2: a read loop that hands each
stream's events to that stream's queue, and flow-controlled sends (``H2Peer``); ``H2Upstream``
is such a connection to one VM port with the task that reads it, as a client's session keeps it
(both wings' ``relay_h2``: force-h2 and gRPC).

Data is acknowledged (the peer's window reopened) only when whoever consumed it says so, so
a slow reader on one side slows the writer on the other: backpressure end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import h2.events as ev
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes, Settings

from embervm.proxy.admission import Target
from embervm.proxy.limits import READ_SIZE
from embervm.proxy.streams import close_quietly
from embervm.proxy.upstream import DIRECT, Upstream

WINDOW = 1024 * 1024
MAX_HEADER_LIST = 64 * 1024
MAX_STREAMS = 256
IDLE_TIMEOUT = 120.0  # an app connection without a stream is closed after this

StreamEvent = ev.Event | None  # None: the connection is gone
Header = tuple[bytes, bytes]


def new_connection() -> H2Connection:
    """Our settings are the initial values (assigning ``local_settings.x`` would only queue a
    change that the preface does not carry: peers would keep the 64 KiB default window)."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    values = {
        SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        SettingCodes.ENABLE_PUSH: 0,
    }
    conn.local_settings = Settings(client=True, initial_values=values)
    return conn


class StreamGone(Exception):
    """The stream (or the whole connection) was reset or closed while we used it."""


class H2Peer:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: H2Connection,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.queues: dict[int, asyncio.Queue[StreamEvent]] = {}
        self._window = asyncio.Event()
        self.closed = False

    def start(self) -> None:
        """Send our preface and settings (and the window we grant the connection)."""
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(WINDOW)
        self.write_pending()

    def write_pending(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def flush(self) -> None:
        self.write_pending()
        await self.writer.drain()

    def queue(self, stream_id: int) -> asyncio.Queue[StreamEvent]:
        q = self.queues.get(stream_id)
        if q is None:
            q = self.queues[stream_id] = asyncio.Queue()
        return q

    def forget(self, stream_id: int) -> None:
        self.queues.pop(stream_id, None)

    # -- reading -------------------------------------------------------------------------

    async def read_loop(self, idle_timeout: float) -> None:
        """Until the peer goes away (then every open stream gets ``None``)."""
        try:
            while True:
                async with asyncio.timeout(idle_timeout if not self.queues else None):
                    data = await self.reader.read(READ_SIZE)
                if not data:
                    return
                self._dispatch(self.conn.receive_data(data))
                await self.flush()
        except (TimeoutError, ConnectionError, H2Error, OSError):
            return
        finally:
            self.closed = True
            self._window.set()
            for q in self.queues.values():
                q.put_nowait(None)

    def _dispatch(self, events: Iterable[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.WindowUpdated | ev.RemoteSettingsChanged):
                self._window.set()
            elif isinstance(event, ev.ConnectionTerminated):
                self.closed = True
                self._window.set()
                for q in self.queues.values():
                    q.put_nowait(None)
            else:
                stream_id = getattr(event, "stream_id", None)
                if stream_id is not None and stream_id in self.queues:
                    self.queues[stream_id].put_nowait(event)
                    if isinstance(event, ev.StreamReset):
                        self._window.set()

    # -- writing -------------------------------------------------------------------------

    async def send_headers(
        self, stream_id: int, headers: list[Header], *, end: bool = False
    ) -> None:
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end)
        except (StreamClosedError, H2Error) as exc:
            raise StreamGone(str(exc)) from exc
        await self.flush()

    async def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        view = memoryview(data)
        while view:
            if self.closed:
                raise StreamGone("connection closed")
            try:
                window = min(
                    self.conn.local_flow_control_window(stream_id),
                    self.conn.max_outbound_frame_size,
                )
            except (StreamClosedError, H2Error) as exc:
                raise StreamGone(str(exc)) from exc
            if window <= 0:
                self._window.clear()
                await self._window.wait()
                continue
            try:
                self.conn.send_data(stream_id, bytes(view[:window]))
            except (StreamClosedError, H2Error) as exc:
                raise StreamGone(str(exc)) from exc
            view = view[window:]
            await self.flush()
        if end:
            await self.end(stream_id)

    async def end(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except (StreamClosedError, H2Error) as exc:
            raise StreamGone(str(exc)) from exc
        await self.flush()

    def acknowledge(self, stream_id: int, length: int) -> None:
        with contextlib.suppress(H2Error):
            self.conn.acknowledge_received_data(length, stream_id)
        self.write_pending()

    def reset(self, stream_id: int, code: int = 0x8) -> None:
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(stream_id, code)
        self.write_pending()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self.write_pending()
        await close_quietly(self.writer)


class H2Upstream:
    """One h2c connection to an app port and the task that reads it."""

    def __init__(self, target: Target, peer: H2Peer) -> None:
        self.target = target
        self.peer = peer
        self.reading = asyncio.create_task(peer.read_loop(IDLE_TIMEOUT))

    @classmethod
    async def open(cls, target: Target, upstream: Upstream = DIRECT) -> H2Upstream:
        reader, writer = await upstream.connect(target)
        peer = H2Peer(reader, writer, new_connection())
        peer.start()
        await peer.flush()
        return cls(target, peer)

    def usable(self, target: Target) -> bool:
        return self.target == target and not self.peer.closed and not self.reading.done()

    async def close(self) -> None:
        self.reading.cancel()
        with contextlib.suppress(BaseException):
            await self.reading
        await self.peer.close()

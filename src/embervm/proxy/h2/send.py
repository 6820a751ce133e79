"""The sending half of ``h2.frame_layer``: answers framed within the client's flow-control windows.

What the client has no window for is held per stream, and each held stream waits in one of two
sets: blocked on the connection's window, or on its own. A connection WINDOW_UPDATE visits only
the first set and stops when the window is spent again, so a client that grants one byte at a
time makes us visit one stream per frame, not every held one (audit A2). ``held_bytes`` is what
all the streams hold: the session stops reading its apps while it is above its budget (B7).
"""

from __future__ import annotations

from embervm.proxy.h2.frames import (
    ABUSE_CREDIT,
    CLOSED_MEMORY,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    INTERNAL_ERROR,
    NO_ERROR,
    RST_STREAM,
    U32,
    WINDOW,
    WINDOW_UPDATE,
    H2ConnectionError,
    Stream,
    StreamHandler,
    frame,
)
from embervm.proxy.h2.hpack import Header, HeaderEncoder


class H2Sending:
    """Frames out for ``H2Server`` (its base: the state below is the server's)."""

    handler: StreamHandler
    out: bytearray
    streams: dict[int, Stream]
    closed: bool
    _last_stream: int
    _encoder: HeaderEncoder
    _send_window: int  # what we may still send on the connection
    _max_send_frame: int
    _credit: int
    _recv_window: int  # what the client may still send on the connection
    _conn_unacked: int

    def __init__(self) -> None:
        self.held_bytes = 0  # answer bytes held for want of the client's windows
        self._conn_blocked: dict[int, Stream] = {}  # held for the connection's window only
        self._stream_blocked: dict[int, Stream] = {}  # held for their own window
        self._ungranted = 0  # DATA we sent that connection WINDOW_UPDATEs did not give back
        self._closed_early: dict[int, int] = {}  # see ``_rst``: the newest CLOSED_MEMORY

    def send_headers(self, stream_id: int, headers: list[Header], *, end: bool = False) -> None:
        """A response head (``end``: and no body), or trailers (``end`` set) after the data
        already given to ``send_data``. Nothing when the stream is gone."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if stream.pending:  # trailers after data still waiting for window
            stream.trailers = headers
            stream.pending_end = True
            return
        self._header_frames(stream_id, headers, end)
        if end:
            self._finished(stream)

    def _header_frames(self, stream_id: int, headers: list[Header], end: bool) -> None:
        block = self._encoder.encode(headers)  # encoded as sent: HPACK's table is in order
        flags = END_STREAM if end else 0
        limit = self._max_send_frame
        if len(block) <= limit:
            self.out += frame(HEADERS, flags | END_HEADERS, stream_id, block)
            return
        self.out += frame(HEADERS, flags, stream_id, block[:limit])
        for start in range(limit, len(block), limit):
            last = start + limit >= len(block)
            self.out += frame(CONTINUATION, END_HEADERS if last else 0, stream_id,
                              block[start : start + limit])  # fmt: skip

    def window(self, stream_id: int) -> int:
        """How many body bytes the stream may send now (0 when it is gone)."""
        stream = self.streams.get(stream_id)
        return 0 if stream is None else max(0, min(stream.send_window, self._send_window))

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> bool:
        """Body bytes (``end``: the last). True when all went out; False when some wait for
        the client's window (``on_drained`` tells when they went), or the stream is gone."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return False
        stream.pending = stream.pending + data if stream.pending else data
        stream.pending_end = end
        self.held_bytes += len(data)
        return self._flush(stream)

    def _flush(self, stream: Stream) -> bool:
        pending = stream.pending
        end = stream.pending_end and stream.trailers is None  # END_STREAM on the last DATA
        while pending:
            size = min(len(pending), stream.send_window, self._send_window, self._max_send_frame)
            if size <= 0:
                stream.pending = pending
                self._hold(stream)
                return False
            last = size == len(pending)
            self.out += frame(DATA, END_STREAM if last and end else 0, stream.id,
                              pending if last else pending[:size])  # fmt: skip
            stream.send_window -= size
            self._send_window -= size
            self.held_bytes -= size
            stream.ungranted += size
            self._ungranted += size
            if last:
                break
            pending = pending[size:]
        else:
            if end:  # nothing (more) to send but the end
                self.out += frame(DATA, END_STREAM, stream.id)
        stream.pending = b""
        was_blocked = self._unhold(stream)
        if stream.pending_end:
            if stream.trailers is not None:
                self._header_frames(stream.id, stream.trailers, True)
            self._finished(stream)
        if was_blocked:
            self.handler.on_drained(stream.id)
        return True

    def _hold(self, stream: Stream) -> None:
        if stream.send_window > 0:
            self._stream_blocked.pop(stream.id, None)
            self._conn_blocked[stream.id] = stream
        else:
            self._conn_blocked.pop(stream.id, None)
            self._stream_blocked[stream.id] = stream

    def _unhold(self, stream: Stream) -> bool:
        return (self._conn_blocked.pop(stream.id, None) is not None
                or self._stream_blocked.pop(stream.id, None) is not None)  # fmt: skip

    def _flush_blocked(self) -> None:
        """The connection's window grew: send what waits for it, while it lasts."""
        for stream in list(self._conn_blocked.values()):
            if self._send_window <= 0:
                return
            if self._conn_blocked.get(stream.id) is stream:  # not reset by an earlier drain
                self._flush(stream)

    def _reopen_streams(self) -> None:
        """INITIAL_WINDOW_SIZE grew: streams held for their own window go on, or now wait
        for the connection's."""
        for stream in list(self._stream_blocked.values()):
            if stream.send_window > 0 and self._stream_blocked.get(stream.id) is stream:
                if self._send_window > 0:
                    self._flush(stream)
                else:
                    self._hold(stream)

    def _finished(self, stream: Stream) -> None:
        """We ended the stream: if the client is still sending, it may stop (RFC 9113 §8.1)."""
        if stream.remote_open:
            self._rst(stream.id, NO_ERROR)
        self._forget(stream)
        self._credit = min(self._credit + 1, ABUSE_CREDIT)

    def reset(self, stream_id: int, code: int = INTERNAL_ERROR) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._rst(stream_id, code)
            self._forget(stream)

    def close(self, code: int = NO_ERROR) -> None:
        """GOAWAY: no new streams (and with an error, none of the open ones either)."""
        if not self.closed:
            self.closed = True
            self.out += frame(GOAWAY, 0, 0, U32.pack(self._last_stream) + U32.pack(code))

    def _rst(self, stream_id: int, code: int) -> None:
        """RST_STREAM. The id is remembered for a while, with the DATA bytes the client may
        still send on it (its window): what it sent before it heard of the reset is still
        coming, and is neither a protocol error nor abuse."""
        self.out += frame(RST_STREAM, 0, stream_id, U32.pack(code))
        stream = self.streams.get(stream_id)
        self._closed_early[stream_id] = WINDOW if stream is None else stream.recv_window
        if len(self._closed_early) > CLOSED_MEMORY:
            del self._closed_early[next(iter(self._closed_early))]

    def _forget(self, stream: Stream) -> None:
        del self.streams[stream.id]
        self._unhold(stream)
        self.held_bytes -= len(stream.pending)
        stream.pending = b""
        if stream.held:  # handed over, never consumed: the connection's window comes back
            self._ack_connection(stream.held)
            stream.held = 0

    def _ack_connection(self, size: int) -> None:
        """``size`` bytes the client sent were consumed or discarded: WINDOW_UPDATE (batched)."""
        self._conn_unacked += size
        if self._conn_unacked >= WINDOW // 2:
            self.out += frame(WINDOW_UPDATE, 0, 0, U32.pack(self._conn_unacked))
            self._recv_window += self._conn_unacked
            self._conn_unacked = 0

    def _spend(self, cost: int = 1) -> None:
        self._credit -= cost
        if self._credit <= 0:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "too many resets or empty frames")

"""HTTP/2 (RFC 9113), the server side of one client connection, as a frame layer without I/O.

``H2Server.receive`` takes the client's bytes and calls its ``StreamHandler`` (the session) for
each request, body piece, end and reset; what the session sends (``send_headers``,
``send_data``, ``reset``) and what the protocol itself answers (SETTINGS and PING
acknowledgements, WINDOW_UPDATE, GOAWAY) is appended to ``out``, which the session writes
once per turn of the event loop. HPACK is jh2's compiled codec behind a structural check
(``h2.hpack``); request header lists are checked by ``h2.fields``; the sending half is
``h2.send``.

Written here rather than taken from h2 because h2's state machine costs ~50 µs per request on
this machine even with jh2's HPACK (docs/ARCHITECTURE.md, "Where the code departs from the
design"). What it enforces:

- frame sizes (16 KiB, our SETTINGS_MAX_FRAME_SIZE) and every frame's length and stream rules;
  a header block (HEADERS + CONTINUATION) is at most ``MAX_HEADER_BLOCK`` bytes counting frame
  headers (so empty CONTINUATION frames cannot go on forever) and nothing else may interleave;
- every header block is decoded, even for streams it refuses (HPACK's table stays in step);
  the decoded list is bounded by ``MAX_HEADER_LIST`` (our SETTINGS_MAX_HEADER_LIST_SIZE);
- flow control both ways: the client may send only what we granted (1 MiB per stream and for
  the connection), and a grant is renewed only when the session says the data was consumed
  (forwarded to the app); we send only within the client's windows, holding the rest per
  stream (the session stops reading the app while a stream holds data: nothing buffered whole);
- SETTINGS_MAX_CONCURRENT_STREAMS: a stream counts until it is reset or we have sent all of
  its answer (data held for want of window included); beyond it, REFUSED_STREAM;
- stream ids only grow: a HEADERS frame opening a stream below one already opened (or on a
  stream both sides closed) is a PROTOCOL_ERROR; frames the client sent before it heard of our
  RST_STREAM are ignored;
- rapid reset (CVE-2023-44487) and other floods of frames that cost us and bring nothing
  (resets, refused or malformed streams, PRIORITY, empty DATA, unknown frame types, frames on
  closed streams, WINDOW_UPDATEs that unblock nothing and answer none of our DATA, SETTINGS
  after the first and ACKs we did not ask for): each spends one of ``ABUSE_CREDIT`` credits,
  each completed stream earns one back; at zero, GOAWAY ENHANCE_YOUR_CALM. No frame costs more
  than the streams it moves on (audit A2: a WINDOW_UPDATE visits only streams waiting for the
  connection's window, a SETTINGS frame walks the streams once). Frames that we must answer
  (PING, SETTINGS) are answered through the same output, and the session stops reading a
  client that does not read its answers.
"""

from __future__ import annotations

from embervm.proxy.h2 import fields as request_fields
from embervm.proxy.h2.fields import Malformed, Request
from embervm.proxy.h2.frames import (
    ABUSE_CREDIT,
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEAD,
    HEADERS,
    INTERNAL_ERROR,
    MAX_FRAME,
    MAX_HEADER_BLOCK,
    MAX_HEADER_LIST,
    MAX_STREAMS,
    MAX_TABLE,
    MAX_WINDOW,
    NO_ERROR,
    OUR_SETTINGS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RST_STREAM,
    SELF_DEPENDENT,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    U32,
    WINDOW,
    WINDOW_UPDATE,
    H2ConnectionError,
    Stream,
    StreamHandler,
    frame,
)
from embervm.proxy.h2.hpack import Header, HeaderDecoder, HeaderEncoder, HpackError
from embervm.proxy.h2.send import H2Sending

__all__ = [
    "ABUSE_CREDIT",
    "CANCEL",
    "COMPRESSION_ERROR",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME_SIZE_ERROR",
    "INTERNAL_ERROR",
    "MAX_HEADER_BLOCK",
    "MAX_STREAMS",
    "NO_ERROR",
    "PREFACE",
    "PROTOCOL_ERROR",
    "REFUSED_STREAM",
    "STREAM_CLOSED",
    "WINDOW",
    "H2ConnectionError",
    "H2Server",
    "Stream",
    "StreamHandler",
    "frame",
]


class H2Server(H2Sending):
    def __init__(self, handler: StreamHandler) -> None:
        super().__init__()
        self.handler = handler
        self.out = bytearray(frame(SETTINGS, 0, 0, OUR_SETTINGS))
        self.out += frame(WINDOW_UPDATE, 0, 0, U32.pack(WINDOW - 65535))
        self.streams: dict[int, Stream] = {}
        self.closed = False  # a connection error (GOAWAY sent) or the client's GOAWAY
        self.goaway_received = False
        self._buf = b""
        self._preface = False
        self._settings_seen = False
        self._settings_acked = False  # we send one SETTINGS: one ACK is due
        self._last_stream = 0
        self._decoder = HeaderDecoder(MAX_HEADER_LIST)
        self._encoder = HeaderEncoder()
        self._block: list[bytes] = []  # a header block waiting for CONTINUATION
        self._block_stream = 0
        self._block_flags = 0
        self._block_size = 0
        self._recv_window = WINDOW  # what the client may still send on the connection
        self._conn_unacked = 0
        self._send_window = 65535  # what we may still send on the connection
        self._initial_send_window = 65535
        self._max_send_frame = MAX_FRAME
        self._credit = ABUSE_CREDIT

    # -- starting ----------------------------------------------------------------------------

    def upgraded(self, settings: bytes, request: Request) -> None:
        """``Upgrade: h2c``: the client's HTTP2-Settings apply, and its HTTP/1.1 request is
        stream 1, whose sending side is already closed (RFC 9113 §3.2 of RFC 7540)."""
        try:
            self._apply_settings(settings)
        except H2ConnectionError as exc:
            self.close(exc.code)
            return
        self._last_stream = 1
        self.streams[1] = Stream(1, self._initial_send_window, False, request.length)
        self.handler.on_request(1, request, True)

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self._buf + data if self._buf else data
        try:
            pos = 0
            if not self._preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(buf):
                        raise H2ConnectionError(PROTOCOL_ERROR, "no preface")
                    self._buf = buf
                    return
                if not buf.startswith(PREFACE):
                    raise H2ConnectionError(PROTOCOL_ERROR, "no preface")
                self._preface = True
                pos = len(PREFACE)
            size = len(buf)
            while size - pos >= 9:
                high, low, kind, flags, stream_id = HEAD.unpack_from(buf, pos)
                length = (high << 16) | low
                if length > MAX_FRAME:
                    raise H2ConnectionError(FRAME_SIZE_ERROR, "frame too large")
                end = pos + 9 + length
                if end > size:
                    break
                self._frame(kind, flags, stream_id & 0x7FFFFFFF, buf[pos + 9 : end])
                pos = end
                if self.closed:
                    return
            self._buf = buf[pos:]
        except H2ConnectionError as exc:
            self.close(exc.code)

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block:
            if kind != CONTINUATION or stream_id != self._block_stream:
                raise H2ConnectionError(PROTOCOL_ERROR, "header block interrupted")
            self._continuation(flags, payload)
        elif not self._settings_seen:
            if kind != SETTINGS or flags & ACK:
                raise H2ConnectionError(PROTOCOL_ERROR, "first frame is not SETTINGS")
            self._settings(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if len(payload) != 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "PING length")
            if stream_id:
                raise H2ConnectionError(PROTOCOL_ERROR, "PING on a stream")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            if stream_id:
                raise H2ConnectionError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "GOAWAY length")
            self.goaway_received = True
        elif kind == PRIORITY:
            if not stream_id:
                raise H2ConnectionError(PROTOCOL_ERROR, "PRIORITY on the connection")
            self._spend()
            if len(payload) != 5:
                self._stream_error(stream_id, FRAME_SIZE_ERROR)
        elif kind in (PUSH_PROMISE, CONTINUATION):
            raise H2ConnectionError(PROTOCOL_ERROR, "unexpected frame")
        else:
            self._spend()  # an extension frame: ignored (RFC 9113 §4.1)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise H2ConnectionError(PROTOCOL_ERROR, "bad padding")
        return payload[1 : len(payload) - payload[0]]

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, "HEADERS on the connection")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "HEADERS priority")
            if U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                flags |= SELF_DEPENDENT  # a stream error once the block is decoded
            payload = payload[5:]
        self._block_stream, self._block_flags = stream_id, flags
        self._block_size = 9 + len(payload)
        if flags & END_HEADERS:
            self._header_block(payload)
        else:
            self._block = [payload]

    def _continuation(self, flags: int, payload: bytes) -> None:
        self._block_size += 9 + len(payload)
        if self._block_size > MAX_HEADER_BLOCK:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        self._block.append(payload)
        if flags & END_HEADERS:
            block, self._block = b"".join(self._block), []
            self._header_block(block)

    def _header_block(self, block: bytes) -> None:
        if self._block_size > MAX_HEADER_BLOCK:
            raise H2ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        try:
            headers = self._decoder.decode(block)
        except HpackError:
            raise H2ConnectionError(COMPRESSION_ERROR, "bad header block") from None
        stream_id, flags = self._block_stream, self._block_flags
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(stream, flags, headers)
        elif stream_id % 2 == 0 or stream_id > self._last_stream:
            self._new_stream(stream_id, flags, headers)
        elif stream_id in self._closed_early:
            self._spend()  # trailers sent before the client heard of our reset: ignored
        else:  # a new stream below one already opened, or one both sides closed
            raise H2ConnectionError(PROTOCOL_ERROR, "stream id reused or out of order")

    def _new_stream(self, stream_id: int, flags: int, headers: list[Header]) -> None:
        if stream_id % 2 == 0:
            raise H2ConnectionError(PROTOCOL_ERROR, "even stream id")
        self._last_stream = stream_id
        if self.goaway_received:
            return  # the client said it was leaving
        if flags & SELF_DEPENDENT or len(self.streams) >= MAX_STREAMS:
            self._spend()
            self._rst(stream_id, PROTOCOL_ERROR if flags & SELF_DEPENDENT else REFUSED_STREAM)
            return
        try:
            request = request_fields.request(headers)
        except Malformed:
            self._spend()
            self._rst(stream_id, PROTOCOL_ERROR)
            return
        ended = bool(flags & END_STREAM)
        if ended and request.length > 0:
            self._spend()
            self._rst(stream_id, PROTOCOL_ERROR)
            return
        self.streams[stream_id] = Stream(stream_id, self._initial_send_window, not ended,
                                         request.length)  # fmt: skip
        self.handler.on_request(stream_id, request, ended)

    def _trailers(self, stream: Stream, flags: int, headers: list[Header]) -> None:
        if not stream.remote_open:
            self._stream_error(stream.id, STREAM_CLOSED)
            return
        try:
            if not flags & END_STREAM or flags & SELF_DEPENDENT:
                raise Malformed("trailers must end the stream")
            request_fields.trailers(headers)
            self._check_length(stream)
        except Malformed:
            self._stream_error(stream.id, PROTOCOL_ERROR)
            return
        stream.remote_open = False
        self.handler.on_trailers(stream.id, headers)
        if stream.id in self.streams:
            self.handler.on_end(stream.id)

    @staticmethod
    def _check_length(stream: Stream) -> None:
        if stream.length >= 0 and stream.received != stream.length:
            raise Malformed("body and content-length differ")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, "DATA on the connection")
        size = len(payload)
        if size > self._recv_window:
            raise H2ConnectionError(FLOW_CONTROL_ERROR, "connection window exceeded")
        self._recv_window -= size
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or not stream.remote_open:
            if stream_id > self._last_stream or stream_id % 2 == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            self._ack_connection(size)  # closed (or reset by us): discarded, window returned
            in_flight = self._closed_early.get(stream_id, 0)
            if stream is not None:
                self._stream_error(stream_id, STREAM_CLOSED)
            if 0 < size <= in_flight:  # sent before the client heard of our reset
                self._closed_early[stream_id] = in_flight - size
            else:
                self._spend()
            return
        if size > stream.recv_window:
            self._ack_connection(size)
            self._stream_error(stream_id, FLOW_CONTROL_ERROR)
            return
        stream.recv_window -= size
        stream.received += len(data)
        if stream.length >= 0 and stream.received > stream.length:
            self._ack_connection(size)
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        if size > len(data):  # padding: consumed at once
            stream.held += size - len(data)
            self.consumed(stream_id, size - len(data))
        if data:
            stream.held += len(data)
            self.handler.on_data(stream_id, data)
        elif not flags & END_STREAM:
            self._spend()
        if flags & END_STREAM and stream_id in self.streams:
            try:
                self._check_length(stream)
            except Malformed:
                self._stream_error(stream_id, PROTOCOL_ERROR)
                return
            stream.remote_open = False
            self.handler.on_end(stream_id)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        """A grant that unblocks nothing and gives back none of the DATA we sent (more than
        the client's grants so far gave back) spends a credit: a client that grants as it
        reads spends none, one that sends +1 after +1 spends one each."""
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise H2ConnectionError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            if not self._conn_blocked and self._ungranted <= 0:
                self._spend()
            self._ungranted = max(0, self._ungranted - increment)
            self._flush_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream or stream_id % 2 == 0:
                raise H2ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            self._spend()  # closed: ignored
            return
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR)
            return
        if stream.id not in self._stream_blocked and stream.ungranted <= 0:
            self._spend()
        stream.ungranted = max(0, stream.ungranted - increment)
        if stream.pending or stream.pending_end:
            self._flush(stream)

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM length")
        if not stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on the connection")
        stream = self.streams.get(stream_id)
        if stream is None and (stream_id > self._last_stream or stream_id % 2 == 0):
            raise H2ConnectionError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        self._spend()
        if stream is not None:
            self._forget(stream)
            self.handler.on_reset(stream_id)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        """Every SETTINGS frame after the first, and every ACK we did not ask for, spends a
        credit, and one more per 32 streams whose windows it changed."""
        if stream_id:
            raise H2ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self._settings_acked:
                self._spend()
            self._settings_acked = True
            return
        walked = self._apply_settings(payload)
        if self._settings_seen:
            self._spend(1 + walked // 32)
        self._settings_seen = True
        self.out += frame(SETTINGS, ACK, 0)

    def _apply_settings(self, payload: bytes) -> int:
        """Apply a SETTINGS payload (each setting's last value wins); returns how many open
        streams a new INITIAL_WINDOW_SIZE changed (walked once, whatever the entries)."""
        if len(payload) % 6:
            raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length")
        initial_window = self._initial_send_window
        for code, value in SETTING.iter_unpack(payload):
            if code == 0x1:  # HEADER_TABLE_SIZE: our encoder's table, at most that
                self._encoder.set_table_size(min(value, MAX_TABLE))
            elif code == 0x2 and value > 1:  # ENABLE_PUSH (we never push)
                raise H2ConnectionError(PROTOCOL_ERROR, "ENABLE_PUSH")
            elif code == 0x4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                if value > MAX_WINDOW:
                    raise H2ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE")
                initial_window = value
            elif code == 0x5:  # MAX_FRAME_SIZE
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise H2ConnectionError(PROTOCOL_ERROR, "MAX_FRAME_SIZE")
                self._max_send_frame = min(value, 4 * MAX_FRAME)
        delta, self._initial_send_window = (
            initial_window - self._initial_send_window,
            initial_window,
        )
        if not delta:
            return 0
        for stream in self.streams.values():
            stream.send_window += delta
            if stream.send_window > MAX_WINDOW:
                raise H2ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
        if delta > 0:
            self._reopen_streams()
        return len(self.streams)

    # -- flow control of what the client sends -------------------------------------------------

    def consumed(self, stream_id: int, size: int) -> None:
        """``size`` bytes of the stream's body went on: the client may send as much again."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # forgotten: what it held was given back then
        stream.held -= size
        if stream.remote_open:
            stream.unacked += size
            if stream.unacked >= WINDOW // 2:
                self.out += frame(WINDOW_UPDATE, 0, stream_id, U32.pack(stream.unacked))
                stream.recv_window += stream.unacked
                stream.unacked = 0
        self._ack_connection(size)

    # -- helpers -------------------------------------------------------------------------------

    def _stream_error(self, stream_id: int, code: int) -> None:
        self._rst(stream_id, code)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._forget(stream)
            self.handler.on_reset(stream_id)

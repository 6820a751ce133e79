"""The HTTP/2 frame layer fed structured-random and mutated frame sequences, cut anywhere.

Whatever a client sends, ``H2Server.receive`` returns: no exception escapes (a connection error
is a GOAWAY), what it queues in ``out`` is bounded by what it read, and its bookkeeping holds
(held bytes, blocked streams, the stream limit). A hang would trip pytest's timeout."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embervm.proxy.h2.fields import Request
from embervm.proxy.h2.frame_layer import H2Server
from embervm.proxy.h2.frames import GOAWAY, MAX_STREAMS, PREFACE, SETTINGS, U32, frame

pytestmark = pytest.mark.timeout(120)

BODY = b"b" * 100  # what the fake session answers, at most, per event
STREAM_IDS = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11, 13, 101, 2**31 - 1])
REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"vm.example"),
           (b":path", b"/")]  # fmt: skip


class Session:
    """A session that answers as it goes: a head and some body per request, a piece of body
    per DATA (consumed at once, or never), and resets now and then."""

    server: H2Server  # set once made: the server is made with its session

    def __init__(self, choices: st.DataObject) -> None:
        self.choices = choices

    def _maybe(self) -> bool:
        return self.choices.draw(st.booleans())

    def on_request(self, stream_id: int, request: Request, ended: bool) -> None:
        self.server.send_headers(stream_id, [(b":status", b"200")])
        self.server.send_data(stream_id, BODY, end=self._maybe())

    def on_data(self, stream_id: int, data: bytes) -> None:
        if self._maybe():
            self.server.consumed(stream_id, len(data))
        if self._maybe():
            self.server.send_data(stream_id, BODY[: len(data)])

    def on_end(self, stream_id: int) -> None:
        if self._maybe():
            self.server.send_headers(stream_id, [(b"grpc-status", b"0")], end=True)

    def on_trailers(self, stream_id: int, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def on_reset(self, stream_id: int) -> None:
        pass

    def on_drained(self, stream_id: int) -> None:
        if self._maybe():
            self.server.reset(stream_id)


def settings_payload(data: st.DataObject) -> bytes:
    """A few settings, each within its allowed range (for a client that means no harm)."""
    entries = data.draw(st.lists(st.sampled_from([1, 3, 4, 5, 6]), max_size=4))
    values = {5: st.integers(16384, 2**24 - 1)}
    return b"".join(code.to_bytes(2, "big")
                    + U32.pack(data.draw(values.get(code, st.integers(0, 70000))))
                    for code in entries)  # fmt: skip


def any_frame(data: st.DataObject) -> bytes:
    """A frame of any type, flags and stream, with a payload of any bytes."""
    kind = data.draw(st.integers(0, 10))
    flags = data.draw(st.integers(0, 255))
    return frame(kind, flags, data.draw(STREAM_IDS), data.draw(st.binary(max_size=300)))


def likely_frame(data: st.DataObject, opened: list[int]) -> bytes:
    """A frame a client might send: requests on new streams, bodies, trailers, grants,
    settings, pings, resets, priorities; now and then with a byte changed."""
    kind = data.draw(st.sampled_from(["request", "request", "data", "data", "trailers", "grant",
                                      "settings", "ping", "reset", "priority"]))  # fmt: skip
    if not opened and kind not in ("settings", "ping"):
        kind = "request"  # frames on streams need one
    stream_id = data.draw(st.sampled_from(opened)) if opened else 0
    if kind == "request":
        stream_id = opened[-1] + 2 if opened else 1
        opened.append(stream_id)
        payload = hpack.Encoder().encode(REQUEST)  # a new encoder: no reference to the table
        flags = 0x4 | data.draw(st.sampled_from([0, 0x1]))
        kind_code = 0x1
    elif kind == "trailers":
        payload, flags, kind_code = hpack.Encoder().encode([(b"x-t", b"1")]), 0x5, 0x1
    elif kind == "data":
        payload = data.draw(st.binary(max_size=300))
        flags, kind_code = data.draw(st.sampled_from([0, 0, 0x1])), 0x0
    elif kind == "grant":
        stream_id = data.draw(st.sampled_from([0, stream_id]))
        payload, flags, kind_code = U32.pack(data.draw(st.integers(1, 70000))), 0, 0x8
    elif kind == "settings":
        payload, flags, kind_code, stream_id = settings_payload(data), 0, 0x4, 0
    elif kind == "ping":
        payload, flags, kind_code, stream_id = b"12345678", 0, 0x6, 0
    elif kind == "reset":
        payload, flags, kind_code = U32.pack(8), 0, 0x3
    else:
        payload, flags, kind_code = U32.pack(0) + b"\x10", 0, 0x2
    if payload and data.draw(st.integers(0, 9)) == 0:  # a mutated byte
        at = data.draw(st.integers(0, len(payload) - 1))
        payload = payload[:at] + bytes([data.draw(st.integers(0, 255))]) + payload[at + 1 :]
    return frame(kind_code, flags, stream_id, payload)


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(st.data())
def test_random_frames_end_in_a_clean_state_or_a_goaway(data: st.DataObject) -> None:
    session = Session(data)
    server = session.server = H2Server(session)
    first = frame(SETTINGS, 0, 0, settings_payload(data))
    opened: list[int] = []
    sent = [any_frame(data) if data.draw(st.integers(0, 9)) == 0 else likely_frame(data, opened)
            for _ in range(data.draw(st.integers(0, 60)))]  # fmt: skip
    stream = PREFACE + first + b"".join(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    out = len(server.out)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        chunk = stream[start:end]
        server.receive(chunk)
        # what it queues: frames it must answer (9-17 bytes per frame read), and the fake
        # session's answers (one head and BODY per event)
        assert len(server.out) - out <= 4 * len(chunk) + 2048 + 40 * (len(BODY) + 40)
        server.out, out = bytearray(), 0
        held = sum(len(stream.pending) for stream in server.streams.values())
        assert server.held_bytes == held
        assert len(server.streams) <= MAX_STREAMS
        assert set(server._conn_blocked) | set(server._stream_blocked) <= set(server.streams)
    if server.closed:
        server.out = bytearray()
        server.receive(frame(GOAWAY, 0, 0, b"\0" * 8))
        assert not server.out  # nothing is read after the connection ended

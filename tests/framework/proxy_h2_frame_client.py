"""A client of the HTTP/2 frame layer (``embervm.proxy.h2.frame_layer``) without I/O: frames
written with hyperframe and hpack (h2's own parts), so every check sees the bytes a peer would
send; the session's side is a ``Recorder`` of what the frame layer told it."""

from __future__ import annotations

from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from embervm.proxy.h2.fields import Request
from embervm.proxy.h2.frame_layer import PREFACE, H2Server

Headers = list[tuple[bytes, bytes]]


@dataclass
class Recorder:
    """The session's side: what the frame layer told it."""

    requests: dict[int, tuple[Request, bool]] = field(default_factory=dict)
    data: dict[int, bytes] = field(default_factory=dict)
    ended: list[int] = field(default_factory=list)
    trailers: dict[int, Headers] = field(default_factory=dict)
    resets: list[int] = field(default_factory=list)
    drained: list[int] = field(default_factory=list)

    def on_request(self, stream_id: int, request: Request, ended: bool) -> None:
        self.requests[stream_id] = (request, ended)

    def on_data(self, stream_id: int, data: bytes) -> None:
        self.data[stream_id] = self.data.get(stream_id, b"") + data

    def on_end(self, stream_id: int) -> None:
        self.ended.append(stream_id)

    def on_trailers(self, stream_id: int, trailers: Headers) -> None:
        self.trailers[stream_id] = trailers

    def on_reset(self, stream_id: int) -> None:
        self.resets.append(stream_id)

    def on_drained(self, stream_id: int) -> None:
        self.drained.append(stream_id)


class Client:
    """A client connection: frames in, frames out, its own HPACK contexts."""

    def __init__(self, settings: dict[int, int] | None = None) -> None:
        self.recorder = Recorder()
        self.server = H2Server(self.recorder)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        first = SettingsFrame(0)
        first.settings = settings or {}
        self.server.receive(PREFACE + first.serialize())

    def send(self, *frames: Frame) -> list[Frame]:
        self.server.receive(b"".join(f.serialize() for f in frames))
        return self.read()

    def read(self) -> list[Frame]:
        data, self.server.out = bytes(self.server.out), bytearray()
        frames = []
        while data:
            head, size = Frame.parse_frame_header(memoryview(data[:9]))
            head.parse_body(memoryview(data[9 : 9 + size]))
            frames.append(head)
            data = data[9 + size :]
        return frames

    def headers(self, stream_id: int, headers: Headers, *flags: str) -> HeadersFrame:
        frame = HeadersFrame(stream_id, self.encoder.encode(headers))
        frame.flags = set(flags) | {"END_HEADERS"}
        return frame


def request(path: bytes = b"/", *extra: tuple[bytes, bytes]) -> Headers:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"vm.example"),
            (b":path", path), *extra]  # fmt: skip


def data(stream_id: int, payload: bytes, *flags: str) -> DataFrame:
    frame = DataFrame(stream_id, payload)
    frame.flags = set(flags)
    return frame


def goaway(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None


def resets(frames: list[Frame]) -> dict[int, int]:
    return {f.stream_id: f.error_code for f in frames if isinstance(f, RstStreamFrame)}


def raw(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([kind, flags])
        + stream_id.to_bytes(4, "big")
        + payload
    )


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")

"""HTTP/2's vocabulary for ``frame_layer``: frame types, flags, error codes, our limits, the
frame header, and the per-stream record (RFC 9113 §4, §6, §7)."""

from __future__ import annotations

import struct
from typing import Protocol

from embervm.proxy.h2.fields import Request
from embervm.proxy.h2.hpack import Header

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_FRAME = 16384  # what we accept (the default: we never announce more)
WINDOW = 1024 * 1024  # what we grant per stream, and for the connection
MAX_STREAMS = 256
MAX_HEADER_LIST = 64 * 1024
MAX_HEADER_BLOCK = 64 * 1024  # compressed, CONTINUATION frames and their headers included
MAX_TABLE = 4096  # HPACK dynamic table either way (the default)
ABUSE_CREDIT = 1000
MAX_WINDOW = 2**31 - 1
CLOSED_MEMORY = 2 * MAX_STREAMS  # ids of streams we closed while the client could still send

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

HEAD = struct.Struct(">BHBBL")  # a frame header: length (24 bits as 8 + 16), type, flags, id
SETTING = struct.Struct(">HL")
U32 = struct.Struct(">L")
SELF_DEPENDENT = 0x100  # not a wire flag: a HEADERS frame whose priority names its own stream
OUR_SETTINGS = b"".join(
    SETTING.pack(code, value)
    for code, value in ((0x3, MAX_STREAMS), (0x4, WINDOW), (0x6, MAX_HEADER_LIST))
)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


class H2ConnectionError(Exception):
    """Ends the connection: GOAWAY with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class StreamHandler(Protocol):
    """What the session does with a connection's streams."""

    def on_request(self, stream_id: int, request: Request, ended: bool) -> None: ...

    def on_data(self, stream_id: int, data: bytes) -> None:
        """Body bytes; the session calls ``consumed`` once they have gone on."""

    def on_end(self, stream_id: int) -> None:
        """The client finished sending (after ``on_trailers`` if it sent trailers)."""

    def on_trailers(self, stream_id: int, trailers: list[Header]) -> None: ...

    def on_reset(self, stream_id: int) -> None:
        """The client reset the stream: forget it (the server sends nothing more on it)."""

    def on_drained(self, stream_id: int) -> None:
        """Everything held for the stream went out: its source may be read again."""


class Stream:
    __slots__ = ("held", "id", "length", "pending", "pending_end", "received", "recv_window",
                 "remote_open", "send_window", "trailers", "unacked", "ungranted")  # fmt: skip

    def __init__(self, stream_id: int, send_window: int, remote_open: bool, length: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = WINDOW
        self.remote_open = remote_open  # the client may still send DATA or trailers
        self.length = length  # content-length, or -1
        self.received = 0
        self.held = 0  # bytes handed to the session and not yet consumed
        self.unacked = 0  # consumed, not yet granted again
        self.pending = b""  # to send when the windows allow
        self.pending_end = False
        self.trailers: list[Header] | None = None
        self.ungranted = 0  # DATA we sent that the client's WINDOW_UPDATEs have not given back

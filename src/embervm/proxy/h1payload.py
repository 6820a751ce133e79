"""An HTTP/1.1 body's payload, framing removed, from bytes fed as they arrive (for relays that
re-frame it, as HTTP/2 does with DATA frames).

Like ``h1body.BodyEnd`` it follows a length, chunk sizes or the connection's end, checks chunk
lines and trailers as strictly as ``h1wire`` does, and keeps nothing but a partial chunk-size or
trailer line (at most ``MAX_CHUNK_LINE`` bytes); unlike it, it hands back the payload without
the chunk lines. Trailers of a chunked body are checked and dropped.
"""

from __future__ import annotations

from embervm.proxy.h1wire import (
    CHUNKED,
    CRLF,
    MAX_CHUNK_LINE,
    NONE,
    TO_CLOSE,
    BadMessage,
    check_trailer,
    chunk_size,
)

_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class Payload:
    """One body: ``feed`` returns its payload in a piece of input and where the body ended."""

    __slots__ = ("chunked", "done", "left", "line", "phase", "to_close")

    def __init__(self, framing: int) -> None:
        self.chunked = framing == CHUNKED
        self.to_close = framing == TO_CLOSE  # ends only when the sender closes
        self.done = framing == NONE
        self.left = max(framing, 0)
        self.phase = _SIZE
        self.line = b""

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """``(payload in data, index where the body ended or len(data))``; ``done`` at the end.
        BadMessage when the chunk framing is malformed."""
        if self.done:
            return b"", 0
        if self.to_close:
            return data, len(data)
        if not self.chunked:
            if self.left >= len(data):
                self.left -= len(data)
                self.done = not self.left
                return data, len(data)
            take, self.left, self.done = self.left, 0, True
            return data[:take], take
        return self._chunks(data)

    def _chunks(self, data: bytes) -> tuple[bytes, int]:
        pieces: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if self.phase == _DATA:
                take = min(self.left, end - pos)
                pieces.append(data[pos : pos + take])
                self.left -= take
                pos += take
                if not self.left:
                    self.phase = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise BadMessage()
                pos = end
                break
            line, self.line = self.line + data[pos : newline + 1], b""
            pos = newline + 1
            if len(line) > MAX_CHUNK_LINE:
                raise BadMessage()
            if self._line(line):
                break
        return b"".join(pieces), pos

    def _line(self, line: bytes) -> bool:
        """One complete line (LF included); True at the body's end."""
        if self.phase == _SIZE:
            self.left = chunk_size(line)
            self.phase = _DATA if self.left else _TRAILER
        elif self.phase == _DATA_END:
            if line != CRLF:
                raise BadMessage()
            self.phase = _SIZE
        elif line == CRLF:  # _TRAILER: the blank line ends the body
            self.done = True
            return True
        else:
            check_trailer(line)
        return False

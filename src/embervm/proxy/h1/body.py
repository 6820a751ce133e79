"""Where an HTTP/1.1 body ends, found in bytes fed as they arrive (for the callback relays).

The HTTP/1.1 relay forwards a body's bytes as they are; ``BodyEnd`` only follows the framing (a
length, chunk sizes, trailers, or the connection's end) to tell where the next message starts.
``Payload`` follows the same framing and also hands back the payload without chunk lines, for
relays that re-frame it (HTTP/2 DATA frames); a chunked body's trailers are checked and
dropped. Nothing is kept but a partial chunk-size or trailer line (at most ``MAX_CHUNK_LINE``
bytes). Chunk lines and trailers are checked as strictly as ``h1.wire`` checks them on streams.
"""

from __future__ import annotations

from embervm.proxy.h1.wire import (
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


class BodyEnd:
    """One body's framing: ``feed`` says how much of each piece belongs to the body."""

    __slots__ = ("chunked", "done", "left", "line", "phase", "to_close")

    def __init__(self, framing: int) -> None:
        self.chunked = framing == CHUNKED
        self.to_close = framing == TO_CLOSE  # ends only when the sender closes
        self.done = framing == NONE
        self.left = max(framing, 0)  # bytes left in the body (or in the current chunk)
        self.phase = _SIZE
        self.line = b""

    def feed(self, data: bytes, start: int = 0) -> int:
        """Take the body's bytes from ``data[start:]``: the index where the body ended (then
        ``done``), or ``len(data)``. BadMessage when the chunk framing is malformed."""
        if self.done:
            return start
        if self.chunked:
            return self._chunks(data, start)
        if self.to_close:
            return len(data)
        take = min(self.left, len(data) - start)
        self.left -= take
        self.done = not self.left
        return start + take

    def _chunks(self, data: bytes, pos: int, pieces: list[bytes] | None = None) -> int:
        """Walk chunked framing from ``pos``; the data bytes go to ``pieces`` when given."""
        end = len(data)
        while pos < end:
            if self.phase == _DATA:
                take = min(self.left, end - pos)
                if pieces is not None:
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
                return end
            line, self.line = self.line + data[pos : newline + 1], b""
            pos = newline + 1
            if len(line) > MAX_CHUNK_LINE:
                raise BadMessage()
            if self._line(line):
                return pos
        return pos

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


class Payload(BodyEnd):
    """One body whose payload is wanted, not only its end."""

    __slots__ = ()

    def payload(self, data: bytes) -> tuple[bytes, int]:
        """``(payload in data, index where the body ended or len(data))``; ``done`` at the end.
        BadMessage when the chunk framing is malformed."""
        if self.done:
            return b"", 0
        if self.chunked:
            pieces: list[bytes] = []
            end = self._chunks(data, 0, pieces)
            return b"".join(pieces), end
        end = self.feed(data)
        return (data if end == len(data) else data[:end]), end


NO_BODY = BodyEnd(NONE)  # done from the start and never changed: one for every bodiless message

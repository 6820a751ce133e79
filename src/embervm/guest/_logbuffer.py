"""App output lines waiting for a reader, bounded by bytes (audit A6).

A guest decides how many ``app.log`` frames it sends and how large their bodies are, so a count
limit alone let it pin ~10 GiB (10,000 frames of 1 MiB). Lines are cut at ``MAX_LINE`` on the way
in and the oldest are dropped (and counted) once the buffered bytes pass ``max_bytes``.
"""

from __future__ import annotations

from collections import deque

from embervm.guest._wire import LogLine
from embervm.guest.agent.apps import MAX_LINE

#: Bytes of unread app output one agent connection may hold.
LOG_BUFFER_BYTES = 4 * 1024 * 1024


class LogBuffer:
    def __init__(self, max_bytes: int = LOG_BUFFER_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._lines: deque[LogLine] = deque()

    def __len__(self) -> int:
        return len(self._lines)

    def append(self, line: LogLine) -> None:
        if len(line.line) > MAX_LINE:
            line = LogLine(line.name, line.stream, line.line[:MAX_LINE], line.ts_ns, line.seq)
        self._lines.append(line)
        self.bytes += len(line.line)
        while self.bytes > self.max_bytes:
            self.bytes -= len(self._lines.popleft().line)
            self.dropped += 1

    def popleft(self) -> LogLine:
        line = self._lines.popleft()
        self.bytes -= len(line.line)
        return line

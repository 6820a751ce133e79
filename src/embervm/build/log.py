"""Build logs: one JSON record per line, followable live, kept after the build.

Record: ``{"ts": "2026-11-22T14:00:00.123456Z", "stream": "stdout"|"stderr"|"build"|"app"|
"warning"|"error"|"end", "step": "3/9" | null, "message": "..."}``. The last record of a
finished build has stream ``end`` and the outcome (SUCCESSFUL or FAILED) as message; followers
stop there. ``logging: {"disabled": {}}`` in the request gives a ``NullBuildLog``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

MAX_LINE = 8192
END = "end"


@dataclass(frozen=True)
class LogRecord:
    ts: str
    stream: str
    message: str
    step: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"ts": self.ts, "stream": self.stream, "step": self.step, "message": self.message},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, line: str) -> LogRecord:
        data = json.loads(line)
        return cls(str(data["ts"]), str(data["stream"]), str(data["message"]), data.get("step"))


class BuildLog(Protocol):
    def emit(self, stream: str, message: str, *, step: str | None = None) -> None: ...

    def close(self, outcome: str) -> None: ...


def _now_iso(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NullBuildLog:
    """Logging disabled: records are dropped."""

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        return None

    def close(self, outcome: str) -> None:
        return None


class MemoryBuildLog:
    """Records kept in a list (tests, and the API's view of a short build)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.records: list[LogRecord] = []
        self.closed: str | None = None
        self._clock = clock

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        self.records.append(LogRecord(_now_iso(self._clock), stream, message[:MAX_LINE], step))

    def close(self, outcome: str) -> None:
        self.closed = outcome
        self.records.append(LogRecord(_now_iso(self._clock), END, outcome))

    def messages(self, stream: str | None = None) -> list[str]:
        return [r.message for r in self.records if stream is None or r.stream == stream]


class LocalBuildLog:
    """Appends records to ``path`` (flushed per record, so followers see them at once)."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")
        self._closed = False

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        if self._closed:
            return
        record = LogRecord(_now_iso(self._clock), stream, message[:MAX_LINE], step)
        self._fh.write(record.to_json() + "\n")
        self._fh.flush()

    def close(self, outcome: str) -> None:
        if self._closed:
            return
        self.emit(END, outcome)
        self._closed = True
        os.fsync(self._fh.fileno())
        self._fh.close()

    def release(self) -> None:
        """Close the file without an end record (the server stops mid-build; a later
        reconciliation marks the build failed)."""
        self._closed = True
        self._fh.close()

    @staticmethod
    async def follow(
        path: Path, *, poll_interval: float = 0.1, idle_timeout: float | None = None
    ) -> AsyncIterator[LogRecord]:
        """Yield records from the start of ``path``, then new ones as they are written, until
        the ``end`` record. ``idle_timeout`` (seconds without a new record) ends the follow
        early, for logs of builds whose writer died."""
        offset = 0
        buffer = b""
        idle = 0.0
        while True:
            chunk = await asyncio.to_thread(_read_from, path, offset)
            offset += len(chunk)
            buffer += chunk
            lines = buffer.split(b"\n")
            buffer = lines.pop()
            for raw in lines:
                if not raw.strip():
                    continue
                try:
                    record = LogRecord.from_json(raw.decode("utf-8", errors="replace"))
                except (ValueError, KeyError):
                    continue
                yield record
                if record.stream == END:
                    return
            if chunk:
                idle = 0.0
                continue
            if idle_timeout is not None and idle >= idle_timeout:
                return
            await asyncio.sleep(poll_interval)
            idle += poll_interval


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(1024 * 1024)
    except FileNotFoundError:
        return b""


def open_build_log(logging: Mapping[str, Any] | None, path: Path) -> BuildLog:
    """The log a build request asks for: ``{"disabled": {}}`` → none, else a local file.

    ``cloudWatch`` settings are accepted and logged locally (there is no CloudWatch here).
    """
    if logging and "disabled" in logging:
        return NullBuildLog()
    return LocalBuildLog(path)


class LineSplitter:
    """Turns an exec's output chunks into whole lines for the log (partial lines are held
    until their newline or ``flush``)."""

    def __init__(self, log: BuildLog, *, step: str | None, keep_last: int = 20) -> None:
        self._log = log
        self._step = step
        self._pending: dict[str, bytes] = {}
        self.last_lines: list[str] = []
        self._keep = keep_last

    def __call__(self, stream: str, chunk: bytes) -> None:
        data = self._pending.get(stream, b"") + chunk
        *lines, rest = data.split(b"\n")
        for raw in lines:
            self._line(stream, raw)
        if len(rest) > MAX_LINE:
            self._line(stream, rest)
            rest = b""
        self._pending[stream] = rest

    def _line(self, stream: str, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        self._log.emit(stream, text, step=self._step)
        if text.strip():
            self.last_lines = [*self.last_lines[-(self._keep - 1) :], text]

    def flush(self) -> None:
        for stream, rest in list(self._pending.items()):
            if rest:
                self._line(stream, rest)
        self._pending.clear()

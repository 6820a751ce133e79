"""Build logs: one JSON record per line, followable live, kept after the build.

Record: ``{"ts": "2026-11-22T14:00:00.123456Z", "stream": "stdout"|"stderr"|"build"|"app"|
"warning"|"error"|"end", "step": "3/9" | null, "message": "..."}``. The last record of a
finished build has stream ``end`` and the outcome (SUCCESSFUL or FAILED) as message; followers
stop there. ``logging: {"disabled": {}}`` in the request gives a ``NullBuildLog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

MAX_LINE = 8192
END = "end"
MAX_BYTES = 64 * 1024 * 1024  # of one build's log; then one "log truncated" record
BATCH_BYTES = 256 * 1024
FLUSH_INTERVAL = 0.1  # a record waits at most this long for its batch
CLOSE_WAIT = 30.0  # close() waits this long for the last batch and the fsync
POLL_INTERVAL = 0.2  # a follower looks for new records this often
_TAIL_ROOM = 2 * 1024  # kept for the "log truncated" and end records
_TAIL_BYTES = 64 * 1024  # of output a splitter reads for the last lines, once the log is full

log = logging.getLogger("embervm.build.log")


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

    @property
    def full(self) -> bool:
        """True when records are being dropped: nobody needs output cut into lines."""
        ...

    def close(self, outcome: str) -> None: ...


def _now_iso(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NullBuildLog:
    """Logging disabled: records are dropped."""

    full = True

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        return None

    def close(self, outcome: str) -> None:
        return None


class MemoryBuildLog:
    """Records kept in a list (tests, and the API's view of a short build)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.records: list[LogRecord] = []
        self.closed: str | None = None
        self.full = False
        self._clock = clock

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        self.records.append(LogRecord(_now_iso(self._clock), stream, message[:MAX_LINE], step))

    def close(self, outcome: str) -> None:
        self.closed = outcome
        self.records.append(LogRecord(_now_iso(self._clock), END, outcome))

    def messages(self, stream: str | None = None) -> list[str]:
        return [r.message for r in self.records if stream is None or r.stream == stream]


class LocalBuildLog:
    """Appends records to ``path``, at most ``max_bytes`` of them.

    ``emit`` runs on the event loop, so it only encodes and queues; a writer thread writes
    what is queued with one write and flush per batch (at ``BATCH_BYTES``, or after
    ``FLUSH_INTERVAL`` so followers see a quiet step's lines soon). A build that prints without
    end (``RUN yes``) fills ``max_bytes``; then one ``warning`` record says the log was cut and
    later records are dropped, until the end record (room is kept for both).
    """

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.time, *, max_bytes: int = MAX_BYTES
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.writes = 0  # batches written (for tests and the curious)
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("ab")
        self._room = max_bytes - _TAIL_ROOM
        self._truncated = False
        self._closed = False
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._stopping = False
        self._sync = True
        self._wake = threading.Condition()
        self._writer = threading.Thread(target=self._write_batches, name="build-log", daemon=True)
        self._writer.start()

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        if self._closed or self._truncated:
            return
        data = self._encode(stream, message[:MAX_LINE], step)
        if len(data) > self._room:
            self._truncated = True
            notice = f"log truncated: a build log keeps at most {self.max_bytes} bytes"
            data = self._encode("warning", notice, None)
        self._room -= len(data)
        self._queue(data)

    @property
    def full(self) -> bool:
        """True once records are dropped (a splitter may stop cutting output into lines)."""
        return self._truncated or self._closed

    def close(self, outcome: str) -> None:
        """Queue the end record and wait for the writer to write, fsync and close."""
        if self._closed:
            return
        self._queue(self._encode(END, outcome, None))
        self._stop(sync=True)

    def release(self) -> None:
        """Close the file without an end record (the server stops mid-build; a later
        reconciliation marks the build failed)."""
        if not self._closed:
            self._stop(sync=False)

    def _encode(self, stream: str, message: str, step: str | None) -> bytes:
        record = LogRecord(_now_iso(self._clock), stream, message, step)
        return (record.to_json() + "\n").encode("utf-8", "replace")

    def _queue(self, data: bytes) -> None:
        with self._wake:
            self._queued.append(data)
            self._queued_bytes += len(data)
            if len(self._queued) == 1 or self._queued_bytes >= BATCH_BYTES:
                self._wake.notify()

    def _stop(self, *, sync: bool) -> None:
        self._closed = True
        with self._wake:
            self._stopping = True
            self._sync = sync
            self._wake.notify()
        self._writer.join(CLOSE_WAIT)
        if self._writer.is_alive():
            log.warning("the build log %s is still being written after %s s", self.path, CLOSE_WAIT)

    def _write_batches(self) -> None:
        """The writer thread: one write and flush per batch, until stopped."""
        failed = False
        while True:
            with self._wake:
                while not self._queued and not self._stopping:
                    self._wake.wait()
                if not self._stopping and self._queued_bytes < BATCH_BYTES:
                    self._wake.wait(FLUSH_INTERVAL)  # let a batch gather
                batch, self._queued, self._queued_bytes = self._queued, [], 0
                stopping = self._stopping
            try:
                if batch:
                    self._fh.write(b"".join(batch))
                    self._fh.flush()
                    self.writes += 1
                if stopping:
                    if self._sync:
                        os.fsync(self._fh.fileno())
                    self._fh.close()
                    return
            except OSError as exc:  # disk full: this batch is lost, later ones are tried
                if not failed:
                    log.warning("could not write the build log %s: %s", self.path, exc)
                failed = True
                if stopping:
                    with contextlib.suppress(OSError):
                        self._fh.close()
                    return

    @staticmethod
    async def follow(
        path: Path, *, poll_interval: float = POLL_INTERVAL, idle_timeout: float | None = None
    ) -> AsyncIterator[LogRecord]:
        """Yield records from the start of ``path``, then new ones as they are written, until
        the ``end`` record. ``idle_timeout`` (seconds without a new record) ends the follow
        early, for logs of builds whose writer died. A quiet log costs one ``stat`` per poll
        (on the loop: it does not wait on the disk's data), no worker thread."""
        offset = 0
        buffer = b""
        idle = 0.0
        while True:
            chunk = b""
            if _size(path) > offset:
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


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(1024 * 1024)
    except FileNotFoundError:
        return b""


def open_build_log(
    logging: Mapping[str, Any] | None, path: Path, *, max_bytes: int = MAX_BYTES
) -> BuildLog:
    """The log a build request asks for: ``{"disabled": {}}`` → none, else a local file of
    at most ``max_bytes``.

    ``cloudWatch`` settings are accepted and logged locally (there is no CloudWatch here).
    """
    if logging and "disabled" in logging:
        return NullBuildLog()
    return LocalBuildLog(path, max_bytes=max_bytes)


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
        full = self._log.full
        if full and len(data) > _TAIL_BYTES:  # records are dropped: only the last lines matter
            data = data[-_TAIL_BYTES:]
            data = data[data.find(b"\n") + 1 :]  # from the first whole line
        *lines, rest = data.split(b"\n")
        for raw in lines[-self._keep :] if full else lines:
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

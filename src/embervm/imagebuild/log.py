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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
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
_RECORD_FLOOR = 70  # bytes of a record besides its message and stream, at least
_TAIL_LINES = 100  # of a chunk a splitter looks at for the last lines, once the log is full

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


@dataclass(frozen=True)
class _Entry:
    """Messages queued for the writer thread, with the time they came and their stream."""

    ts: float
    stream: str
    step: str | None
    messages: Sequence[str]

    def records(self) -> list[bytes]:
        head = f'{{"ts": "{_iso(self.ts)}", "stream": {json.dumps(self.stream)}, '
        head += f'"step": {json.dumps(self.step)}, "message": '
        return [
            f"{head}{json.dumps(m[:MAX_LINE], ensure_ascii=False)}}}\n".encode("utf-8", "replace")
            for m in self.messages
        ]


class BuildLog(Protocol):
    def emit(self, stream: str, message: str, *, step: str | None = None) -> None: ...

    def emit_lines(
        self, stream: str, messages: Sequence[str], *, step: str | None = None
    ) -> None: ...

    @property
    def full(self) -> bool:
        """True when records are being dropped: nobody needs output cut into lines."""
        ...

    def close(self, outcome: str) -> None: ...


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NullBuildLog:
    """Logging disabled: records are dropped."""

    full = True

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        return None

    def emit_lines(self, stream: str, messages: Sequence[str], *, step: str | None = None) -> None:
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
        self.records.append(LogRecord(_iso(self._clock()), stream, message[:MAX_LINE], step))

    def emit_lines(self, stream: str, messages: Sequence[str], *, step: str | None = None) -> None:
        for message in messages:
            self.emit(stream, message, step=step)

    def close(self, outcome: str) -> None:
        self.closed = outcome
        self.records.append(LogRecord(_iso(self._clock()), END, outcome))

    def messages(self, stream: str | None = None) -> list[str]:
        return [r.message for r in self.records if stream is None or r.stream == stream]


class LocalBuildLog:
    """Appends records to ``path``, at most ``max_bytes`` of them.

    ``emit`` and ``emit_lines`` run on the event loop, so they only queue the text with its
    time; a writer thread turns the queue into JSON records and writes them with one write and
    flush per batch (at ``BATCH_BYTES`` of text, or after ``FLUSH_INTERVAL`` so followers see a
    quiet step's lines soon). A build that prints without end (``RUN yes``) fills ``max_bytes``:
    the writer then writes one ``warning`` record saying the log was cut and drops the rest,
    until the end record (room is kept for both). The loop stops queueing as soon as a lower
    bound of the queued records' size passes ``max_bytes``, so the queue stays bounded too.
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
        self._queued_at_least = 0  # bytes the records queued so far take, at least
        self._room = max_bytes - _TAIL_ROOM  # the writer's: bytes left for output records
        self._truncated = False
        self._closed = False
        self._queued: list[_Entry] = []
        self._queued_chars = 0
        self._stopping = False
        self._sync = True
        self._wake = threading.Condition()
        self._writer = threading.Thread(target=self._write_batches, name="build-log", daemon=True)
        self._writer.start()

    def emit(self, stream: str, message: str, *, step: str | None = None) -> None:
        self.emit_lines(stream, (message,), step=step)

    def emit_lines(self, stream: str, messages: Sequence[str], *, step: str | None = None) -> None:
        """One record per message, all with this moment's time."""
        if self.full or not messages:
            return
        chars = sum(min(len(m), MAX_LINE) for m in messages)
        self._queued_at_least += chars + len(messages) * _RECORD_FLOOR
        self._queue(_Entry(self._clock(), stream, step, messages), chars)

    @property
    def full(self) -> bool:
        """True once records are dropped (a splitter may stop cutting output into lines)."""
        return self._queued_at_least > self.max_bytes or self._truncated or self._closed

    def close(self, outcome: str) -> None:
        """Queue the end record and wait for the writer to write, fsync and close."""
        if self._closed:
            return
        self._queue(_Entry(self._clock(), END, None, (outcome,)), len(outcome))
        self._stop(sync=True)

    def release(self) -> None:
        """Close the file without an end record (the server stops mid-build; a later
        reconciliation marks the build failed)."""
        if not self._closed:
            self._stop(sync=False)

    def _queue(self, entry: _Entry, chars: int) -> None:
        with self._wake:
            self._queued.append(entry)
            self._queued_chars += chars
            if len(self._queued) == 1 or self._queued_chars >= BATCH_BYTES:
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

    def _records(self, entries: list[_Entry]) -> bytes:
        """The writer's JSON lines for ``entries``, cut at ``max_bytes`` (the end record is
        always written)."""
        out: list[bytes] = []
        for entry in entries:
            if self._truncated and entry.stream != END:
                continue
            for record in entry.records():
                if entry.stream != END and len(record) > self._room:
                    self._truncated = True
                    notice = f"log truncated: a build log keeps at most {self.max_bytes} bytes"
                    record = _Entry(entry.ts, "warning", None, (notice,)).records()[0]
                    out.append(record)
                    break
                self._room -= len(record)
                out.append(record)
        return b"".join(out)

    def _write_batches(self) -> None:
        """The writer thread: one write and flush per batch, until stopped."""
        failed = False
        while True:
            with self._wake:
                while not self._queued and not self._stopping:
                    self._wake.wait()
                if not self._stopping and self._queued_chars < BATCH_BYTES:
                    self._wake.wait(FLUSH_INTERVAL)  # let a batch gather
                batch, self._queued, self._queued_chars = self._queued, [], 0
                stopping = self._stopping
            try:
                data = self._records(batch)
                if data:
                    self._fh.write(data)
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
    until their newline or ``flush``). A chunk's lines go to the log in one call; once the log
    is full only the last lines are kept (for the failure reason), from the chunk's tail."""

    def __init__(self, log: BuildLog, *, step: str | None, keep_last: int = 20) -> None:
        self._log = log
        self._step = step
        self._pending: dict[str, bytes] = {}
        self.last_lines: list[str] = []
        self._keep = keep_last

    def __call__(self, stream: str, chunk: bytes) -> None:
        data = self._pending.get(stream, b"") + chunk
        if self._log.full:  # only the last lines matter now: cut those off the end
            *lines, rest = data.rsplit(b"\n", _TAIL_LINES)
            lines = lines[1:] if len(lines) == _TAIL_LINES else lines  # [0]: the older ones
        else:
            *lines, rest = data.split(b"\n")
        if len(rest) > MAX_LINE:
            lines.append(rest)
            rest = b""
        self._pending[stream] = rest
        self._lines(stream, lines)

    def _lines(self, stream: str, raw: list[bytes]) -> None:
        if not raw:
            return
        if self._log.full:  # nothing to record: only the last lines are decoded
            self._remember(b.decode("utf-8", "replace").rstrip("\r") for b in reversed(raw))
            return
        texts = [t.rstrip("\r") for t in b"\n".join(raw).decode("utf-8", "replace").split("\n")]
        self._log.emit_lines(stream, texts, step=self._step)
        self._remember(reversed(texts))

    def _remember(self, newest_first: Iterable[str]) -> None:
        """Keep the last ``keep_last`` lines that are not blank."""
        tail: list[str] = []
        for text in newest_first:
            if len(tail) == self._keep:
                break
            if text.strip():
                tail.append(text)
        self.last_lines = [*self.last_lines, *reversed(tail)][-self._keep :]

    def flush(self) -> None:
        for stream, rest in list(self._pending.items()):
            self._lines(stream, [rest] if rest else [])
        self._pending.clear()

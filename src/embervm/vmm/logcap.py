"""Bounded logs of what a guest can make QEMU write: the serial console and QEMU's stderr.

A guest decides how much its kernel prints to ``ttyS0`` (``cat /dev/urandom > /dev/ttyS0``
needs no privilege QEMU can see), so neither may go to a file QEMU appends to without end.
QEMU writes both into pipes the server drains; the file on disk keeps the first ``HEAD_BYTES``
(the boot, for diagnostics) and, once the pipe ends, a marker and the last ``TAIL_BYTES``.
Whatever lies between is counted and dropped, so the file never exceeds ``cap_bytes()``.

The guest is never slowed: the server reads as fast as QEMU writes. When the server is gone
(running VMs outlive a restart) the read end is closed, QEMU's writes fail with EPIPE and its
serial device drops the bytes; a re-attached VM's log ends where the old server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("embervm.vmm")

HEAD_BYTES = 64 << 10
TAIL_BYTES = 16 << 10
_MARKER = b"\n[embervm: %d bytes dropped]\n"
_MARKER_MAX = len(_MARKER % (1 << 63))


def cap_bytes(head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> int:
    """The most a bounded log file ever holds."""
    return head + _MARKER_MAX + tail


class BoundedLog:
    """A log file that keeps its first ``head`` and last ``tail`` bytes (mode 0600).

    The head is written as it arrives (a boot that hangs can be read while it hangs); the
    tail is held in memory and written by ``close``. A write error (disk full) stops the
    writing, never the reader.
    """

    def __init__(self, path: Path, *, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self.path = path
        self.dropped = 0
        self._head_left = head
        self._tail_max = tail
        self._tail = bytearray()
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        os.fchmod(self._fd, 0o600)  # an existing file keeps its mode through O_CREAT

    def write(self, data: bytes) -> None:
        if self._head_left:
            first, data = data[: self._head_left], data[self._head_left :]
            self._head_left -= len(first)
            self._write_file(first)
        if data:
            self._tail += data
            excess = len(self._tail) - self._tail_max
            if excess > 0:
                del self._tail[:excess]
                self.dropped += excess

    def close(self) -> None:
        """Write the marker and the tail, then close (idempotent)."""
        if self._fd is None:
            return
        if self.dropped:
            self._write_file(_MARKER % self.dropped)
        self._write_file(bytes(self._tail))
        self._tail.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_file(self, data: bytes) -> None:
        if self._fd is None or not data:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            log.warning("cannot write %s (%s): the rest of this log is dropped", self.path, exc)
            os.close(self._fd)
            self._fd = None


class _Reader(asyncio.Protocol):
    def __init__(self, sink: BoundedLog, ended: asyncio.Future[None]) -> None:
        self._sink = sink
        self._ended = ended

    def data_received(self, data: bytes) -> None:
        self._sink.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink.close()
        if not self._ended.done():
            self._ended.set_result(None)


class PipeLog:
    """The server's end of one pipe, drained into a ``BoundedLog`` on the event loop."""

    def __init__(self, transport: asyncio.ReadTransport, ended: asyncio.Future[None]) -> None:
        self._transport = transport
        self._ended = ended

    @classmethod
    async def open(cls, read_fd: int, path: Path) -> PipeLog:
        """Drain ``read_fd`` (taken over: closed with the log) into ``path``."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        try:
            sink = BoundedLog(path)
        except OSError:
            os.close(read_fd)
            raise
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: _Reader(sink, ended), pipe)
        except BaseException:
            pipe.close()
            sink.close()
            raise
        return cls(transport, ended)

    async def ended(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait (bounded) until every writer closed the pipe and the file is complete; after
        ``timeout`` the log is closed as it stands."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._ended), timeout)
        self.close()

    def close(self) -> None:
        """Stop reading now: the file keeps what arrived (head, marker, tail)."""
        self._transport.close()

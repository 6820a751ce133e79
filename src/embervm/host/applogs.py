"""App output of each MicroVM, kept in a file so it can be read by anyone, any time.

The agent's log stream is consumed once (a queue), so one pump per running VM copies it to
``DATA_DIR/microvm-logs/<id>.log`` and every reader tails that file: ``embervm logs`` works
while the VM runs, while it is suspended and after it ended. A file is capped (``MAX_BYTES``,
then one rotation to ``.log.1``) so a chatty guest cannot fill the host's disk; a line is capped
at ``MAX_LINE`` bytes. ``<id>.end`` marks a VM that is gone: followers stop there, and the
VM's files are deleted once the marker is older than the retention (``keep_pruning``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from embervm.contracts import MICROVM_ID_RE
from embervm.errors import GuestError
from embervm.guest.client import LogLine

log = logging.getLogger("embervm.host.applogs")

MAX_BYTES = 8 * 1024 * 1024
MAX_LINE = 16 * 1024
POLL = 0.2
DRAIN_TIMEOUT = 2.0
DEFAULT_RETENTION = 7 * 24 * 3600.0
PRUNE_EVERY = 3600.0


class AppLogFiles:
    """``AppLogSource`` over per-VM files, plus the pumps that fill them."""

    def __init__(self, root: Path, *, retention: float = DEFAULT_RETENTION) -> None:
        self.root = root
        self.retention = retention
        self._pumps: dict[str, asyncio.Task[None]] = {}

    def _path(self, microvm_id: str, suffix: str = ".log") -> Path:
        if not MICROVM_ID_RE.match(microvm_id):
            raise ValueError(f"not a MicroVM id: {microvm_id[:80]!r}")
        return self.root / f"{microvm_id}{suffix}"

    # -- writing -------------------------------------------------------------------------

    def pump(self, microvm_id: str, lines: Callable[[], AsyncIterator[LogLine]]) -> None:
        """Copy ``lines()`` into the VM's file until it ends (replaces an earlier pump)."""
        self.stop_pump(microvm_id)
        self._pumps[microvm_id] = asyncio.create_task(
            self._copy(microvm_id, lines), name=f"app-logs-{microvm_id}"
        )

    def stop_pump(self, microvm_id: str) -> None:
        task = self._pumps.pop(microvm_id, None)
        if task is not None:
            task.cancel()

    async def drain(self, microvm_id: str) -> None:
        """The VM's agent connection is closed (suspend, terminate): let its pump copy the
        lines still queued, so a VM's last words are kept, then stop it (bounded)."""
        task = self._pumps.pop(microvm_id, None)
        if task is None:
            return
        _, pending = await asyncio.wait({task}, timeout=DRAIN_TIMEOUT)
        for late in pending:
            late.cancel()

    def end(self, microvm_id: str) -> None:
        """The VM is gone: stop its pump and let followers finish."""
        self.stop_pump(microvm_id)
        with contextlib.suppress(OSError):
            self.root.mkdir(parents=True, exist_ok=True)
            self._path(microvm_id, ".end").touch()

    async def close(self) -> None:
        tasks = list(self._pumps.values())
        self._pumps.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _copy(self, microvm_id: str, lines: Callable[[], AsyncIterator[LogLine]]) -> None:
        path = self._path(microvm_id)
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        dropped = 0  # lines lost since the disk last refused a write
        try:
            async for line in lines():
                text = line.line[:MAX_LINE].rstrip(b"\r\n").decode("utf-8", errors="replace")
                try:
                    await asyncio.to_thread(self._append, path, text + "\n")
                except OSError as exc:  # disk full, quota: drop lines, keep the pump alive
                    if not dropped:
                        log.warning("app log of %s: lines dropped (%s)", microvm_id, exc)
                    dropped += 1
                    continue
                if dropped:
                    log.warning("app log of %s: writing again, %d lines lost", microvm_id, dropped)
                    dropped = 0
        except GuestError as exc:  # the agent went away (suspend, exit): the pump ends
            log.debug("app log pump of %s ended: %s", microvm_id, exc)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size >= MAX_BYTES:
                path.replace(path.with_suffix(".log.1"))
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text)

    # -- retention -----------------------------------------------------------------------

    async def keep_pruning(self) -> None:
        """Prune now and every ``PRUNE_EVERY`` seconds, until cancelled."""
        while True:
            removed = await asyncio.to_thread(self.prune)
            if removed:
                log.info("removed the app logs of %d ended MicroVMs", removed)
            await asyncio.sleep(PRUNE_EVERY)

    def prune(self, now: float | None = None) -> int:
        """Delete the files of VMs that ended more than ``retention`` seconds ago."""
        cutoff = (time.time() if now is None else now) - self.retention
        removed = 0
        try:
            markers = list(self.root.glob("*.end"))
        except OSError:
            return 0
        for marker in markers:
            microvm_id = marker.name.removesuffix(".end")
            try:
                if not MICROVM_ID_RE.match(microvm_id) or marker.stat().st_mtime > cutoff:
                    continue
                for suffix in (".log", ".log.1"):
                    self._path(microvm_id, suffix).unlink(missing_ok=True)
                marker.unlink()  # last: a half-pruned VM is pruned again next time
            except OSError as exc:
                log.warning("could not prune the app logs of %s: %s", microvm_id, exc)
                continue
            removed += 1
        return removed

    # -- reading (AppLogSource) ----------------------------------------------------------

    async def lines(self, microvm_id: str, *, follow: bool) -> AsyncIterator[str]:
        """The VM's lines; a follower of a quiet log costs a ``stat`` per ``POLL`` (on the
        loop: it does not wait on the disk's data) and reads in a worker thread only when the
        file's size changed (it grew, or was rotated)."""
        path, end = self._path(microvm_id), self._path(microvm_id, ".end")
        offset = 0
        pending = ""
        while True:
            chunk = ""
            if _size(path) != offset:
                chunk, offset = await asyncio.to_thread(_read_from, path, offset)
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                yield line
            if chunk:
                continue
            if not follow or end.exists():
                if pending:
                    yield pending
                return
            await asyncio.sleep(POLL)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> tuple[str, int]:
    """New text of ``path`` from ``offset`` (from 0 again if the file was rotated)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            if size < offset:
                offset = 0
            fh.seek(offset)
            data = fh.read(1024 * 1024)
    except FileNotFoundError:
        return "", 0
    return data.decode("utf-8", errors="replace"), offset + len(data)

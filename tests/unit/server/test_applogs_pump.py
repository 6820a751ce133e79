"""The app log pump survives a full disk: lines are dropped while writes fail, and it goes
on writing once they succeed again."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embervm.guest.client import LogLine
from embervm.server.applogs import AppLogFiles

VM = "mvm-" + "d" * 20


class FullDiskFor(AppLogFiles):
    """Writes fail with ENOSPC for the lines numbered in ``failing`` (0-based)."""

    def __init__(self, root: Path, failing: range) -> None:
        super().__init__(root)
        self.failing = failing
        self.calls = 0

    def _append(self, path: Path, text: str) -> None:  # type: ignore[override]
        call, self.calls = self.calls, self.calls + 1
        if call in self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        AppLogFiles._append(path, text)


def lines(count: int) -> AsyncIterator[LogLine]:
    async def gen() -> AsyncIterator[LogLine]:
        for seq in range(count):
            yield LogLine("app", "stdout", f"line {seq}\n".encode(), 0, seq)

    return gen()


async def test_a_full_disk_drops_lines_and_the_pump_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = FullDiskFor(tmp_path, failing=range(2, 5))
    caplog.set_level(logging.WARNING, "embervm.server.applogs")
    logs.pump(VM, lambda: lines(8))
    await logs.drain(VM)
    written = [line async for line in logs.lines(VM, follow=False)]
    assert written == ["line 0", "line 1", "line 5", "line 6", "line 7"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("lines dropped" in m and "No space left" in m for m in messages)
    assert any("writing again, 3 lines lost" in m for m in messages)
    assert len(messages) == 2  # one warning when it starts, one when it ends


async def test_a_disk_that_stays_full_keeps_the_pump_running(tmp_path: Path) -> None:
    logs = FullDiskFor(tmp_path, failing=range(10**9))
    logs.pump(VM, lambda: lines(50))
    task = logs._pumps[VM]
    await asyncio.wait({task}, timeout=10)
    assert task.done()
    assert task.exception() is None
    assert logs.calls == 50  # every line was tried: none killed the pump

"""The app log pump survives a full disk (lines are dropped while writes fail, and it goes
on writing once they succeed again); a follower of a quiet log costs no worker thread."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from embervm.guest.client import LogLine
from embervm.host.applogs import AppLogFiles

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
    caplog.set_level(logging.WARNING, "embervm.host.applogs")
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


async def test_a_follower_of_a_quiet_log_polls_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = AppLogFiles(tmp_path)
    (tmp_path / f"{VM}.log").write_text("before\n")
    hops: list[str] = []
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", "?"))
        return await real_to_thread(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    follower = logs.lines(VM, follow=True)
    assert await anext(follower) == "before"
    polls = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float) -> None:
        nonlocal polls
        polls += 1
        if polls == 200:  # after 200 quiet polls, a new line and the VM's end
            with (tmp_path / f"{VM}.log").open("a") as fh:
                fh.write("after\n")
            logs.end(VM)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    assert [line async for line in follower] == ["after"]
    assert polls == 200
    assert hops == ["_read_from", "_read_from"]  # one read per change, none per poll

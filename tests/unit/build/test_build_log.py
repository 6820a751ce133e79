"""Build logs: timestamped JSON records, live follow until the end, line splitting, disabling."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from embervm.build.log import (
    LineSplitter,
    LocalBuildLog,
    LogRecord,
    MemoryBuildLog,
    NullBuildLog,
    open_build_log,
)


def test_records_are_json_lines_with_timestamps(tmp_path: Path) -> None:
    log = LocalBuildLog(tmp_path / "build.log", clock=lambda: 0.5)
    log.emit("stdout", "hello", step="1/3")
    log.close("SUCCESSFUL")
    lines = [json.loads(x) for x in (tmp_path / "build.log").read_text().splitlines()]
    assert lines[0] == {
        "ts": "1970-01-01T00:00:00.500000Z",
        "stream": "stdout",
        "step": "1/3",
        "message": "hello",
    }
    assert lines[-1]["stream"] == "end"
    assert lines[-1]["message"] == "SUCCESSFUL"


async def test_follow_tails_live_until_the_build_ends(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "build.log"
    seen: list[LogRecord] = []

    async def follower() -> None:
        async for record in LocalBuildLog.follow(path, poll_interval=0.01):
            seen.append(record)

    task = asyncio.create_task(follower())
    await asyncio.sleep(0.05)  # the follower starts before the file exists
    log = LocalBuildLog(path)
    log.emit("build", "Step 1/1: RUN true")
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert [r.message for r in seen] == ["Step 1/1: RUN true"]  # seen before the end
    assert not task.done()
    log.emit("stdout", "done")
    log.close("FAILED")
    await asyncio.wait_for(task, 5)
    assert [r.stream for r in seen] == ["build", "stdout", "end"]


async def test_follow_of_an_abandoned_log_stops_at_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "build.log"
    log = LocalBuildLog(path)
    log.emit("build", "writer died after this")
    log.release()
    records = [r async for r in LocalBuildLog.follow(path, poll_interval=0.01, idle_timeout=0.05)]
    assert [r.message for r in records] == ["writer died after this"]


def test_line_splitter_joins_chunks_and_keeps_last_lines() -> None:
    log = MemoryBuildLog()
    split = LineSplitter(log, step="2/5")
    split("stdout", b"hel")
    split("stderr", b"warn\n")
    split("stdout", b"lo\nwor")
    split.flush()
    assert [(r.stream, r.message) for r in log.records] == [
        ("stderr", "warn"),
        ("stdout", "hello"),
        ("stdout", "wor"),
    ]
    assert split.last_lines == ["warn", "hello", "wor"]
    assert {r.step for r in log.records} == {"2/5"}


def test_logging_disabled_gives_a_null_log(tmp_path: Path) -> None:
    assert isinstance(open_build_log({"disabled": {}}, tmp_path / "x.log"), NullBuildLog)
    log = open_build_log(None, tmp_path / "x.log")
    assert isinstance(log, LocalBuildLog)
    log.close("SUCCESSFUL")
    assert not (tmp_path / "y.log").exists()

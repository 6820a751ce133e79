"""Build logs: timestamped JSON records, live follow until the end, line splitting, disabling."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from embervm.imagebuild.log import (
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


class ThreadsOfWrites:
    """Stands in for the log's file: records which thread made each write."""

    def __init__(self, real: BinaryIO) -> None:
        self.real = real
        self.threads: list[int] = []

    def write(self, data: bytes) -> int:
        self.threads.append(threading.get_ident())
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_flood_of_output_is_cut_at_the_cap_and_written_in_batches_off_the_loop(
    tmp_path: Path,
) -> None:
    cap = 256 * 1024
    log = LocalBuildLog(tmp_path / "build.log", max_bytes=cap)
    file = ThreadsOfWrites(log._fh)
    log._fh = file  # type: ignore[assignment]
    split = LineSplitter(log, step="2/3")
    chunk = b"y\n" * 32 * 1024
    for _ in range(160):  # 10 MiB of `yes`: 5 M lines, about 500 MiB of records uncapped
        split("stdout", chunk)
    split.flush()
    log.close("FAILED")
    data = (tmp_path / "build.log").read_bytes()
    assert len(data) <= cap
    records = [json.loads(line) for line in data.splitlines()]
    assert records[-1] == {
        "ts": records[-1]["ts"],
        "stream": "end",
        "step": None,
        "message": "FAILED",
    }
    assert records[-2]["stream"] == "warning"
    assert records[-2]["message"].startswith("log truncated")
    assert {r["message"] for r in records[:-2]} == {"y"}
    assert threading.get_ident() not in file.threads  # not one write on the emitting thread
    assert 0 < len(file.threads) < len(records) // 100  # batches, not a write per record
    assert split.last_lines == ["y"] * 20


def test_a_full_log_is_not_fed_line_by_line() -> None:
    class Counting(MemoryBuildLog):
        def __init__(self) -> None:
            super().__init__()
            self.full = True

    log = Counting()
    split = LineSplitter(log, step=None)
    split("stdout", b"y\n" * 1024 * 1024 + b"last words\npartial")
    assert log.records == []  # not a million records to drop one by one
    assert split.last_lines == ["y"] * 19 + ["last words"]
    split.flush()
    assert split.last_lines[-1] == "partial"


def test_emit_only_queues_and_a_follower_sees_a_quiet_record_soon(tmp_path: Path) -> None:
    log = LocalBuildLog(tmp_path / "build.log")
    log.emit("build", "one record")
    for _ in range(500):  # the writer's FLUSH_INTERVAL, without a batch to fill
        if (tmp_path / "build.log").stat().st_size:
            break
        time.sleep(0.01)
    assert b"one record" in (tmp_path / "build.log").read_bytes()
    log.release()
    assert log.writes == 1


async def test_a_follower_of_a_quiet_build_log_polls_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "build.log"
    first = LocalBuildLog(path)
    first.emit("build", "Step 1/1: RUN sleep 600")
    first.release()  # the record is on disk before the follower starts
    log = LocalBuildLog(path)
    hops: list[str] = []
    real_to_thread, real_sleep = asyncio.to_thread, asyncio.sleep

    async def counting_to_thread(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(fn, "__name__", "?"))
        return await real_to_thread(fn, *args, **kwargs)

    polls = 0
    follower = asyncio.current_task()  # the comprehension below runs the follow in this task

    async def counting_sleep(delay: float) -> None:
        nonlocal polls
        if asyncio.current_task() is not follower:  # another test's task still winding down
            await real_sleep(delay)
            return
        polls += 1
        if polls == 200:  # after 200 quiet polls the build ends
            await real_to_thread(log.close, "SUCCESSFUL")
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    records = [r.stream async for r in LocalBuildLog.follow(path)]
    assert records == ["build", "end"]
    assert polls == 200
    assert hops.count("_read_from") == 2  # one read per change, none per poll

"""``host/applogs.py``'s files: only MicroVM ids name them, long lines are cut, a full file is
rotated once and readers follow the rotation, followers stop at the end marker, pumps are
drained, replaced and closed (see test_host_applogs_pump/_retention for the rest)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from embervm.errors import GuestError
from embervm.guest.client import LogLine
from embervm.host import applogs
from embervm.host.applogs import AppLogFiles

VM = "mvm-" + "e" * 20


def _source(*raw: bytes, then: BaseException | None = None) -> Callable[[], AsyncIterator[LogLine]]:
    async def gen() -> AsyncIterator[LogLine]:
        for seq, line in enumerate(raw):
            yield LogLine("app", "stdout", line, 0, seq)
        if then is not None:
            raise then

    return gen


def _forever(started: asyncio.Event) -> Callable[[], AsyncIterator[LogLine]]:
    async def gen() -> AsyncIterator[LogLine]:
        started.set()
        await asyncio.Event().wait()
        yield LogLine("app", "stdout", b"never", 0, 0)

    return gen


async def _read(logs: AppLogFiles, *, follow: bool = False) -> list[str]:
    return [line async for line in logs.lines(VM, follow=follow)]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "mvm-short", "MVM-" + "e" * 20, ""])
async def test_only_microvm_ids_name_files(tmp_path: Path, bad: str) -> None:
    logs = AppLogFiles(tmp_path)
    with pytest.raises(ValueError, match="not a MicroVM id"):
        await anext(logs.lines(bad, follow=False))
    with pytest.raises(ValueError, match="not a MicroVM id"):
        logs.end(bad)
    assert os.listdir(tmp_path) == []


async def test_lines_are_cut_and_stripped_and_bad_utf8_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applogs, "MAX_LINE", 8)
    logs = AppLogFiles(tmp_path)
    logs.pump(VM, _source(b"0123456789abc\n", b"crlf\r\n", b"\xffbad\n", then=GuestError("gone")))
    await logs.drain(VM)
    assert await _read(logs) == ["01234567", "crlf", "\ufffdbad"]


async def test_a_full_file_is_rotated_once_and_a_reader_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applogs, "MAX_BYTES", 10)
    logs = AppLogFiles(tmp_path)
    path = tmp_path / f"{VM}.log"
    logs.pump(VM, _source(b"first line\n", b"second\n"))
    await logs.drain(VM)
    assert (tmp_path / f"{VM}.log.1").read_text() == "first line\n"
    assert path.read_text() == "second\n"
    text, offset = applogs._read_from(path, 1000)  # the file shrank: read it from its start
    assert (text, offset) == ("second\n", 7)
    assert applogs._read_from(tmp_path / "absent.log", 5) == ("", 0)


async def test_a_follower_ends_at_the_end_marker_with_the_last_partial_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applogs, "POLL", 0.01)
    logs = AppLogFiles(tmp_path)
    (tmp_path / f"{VM}.log").write_text("one\ntwo\npart")
    follower = asyncio.create_task(_read(logs, follow=True))
    await asyncio.sleep(0.05)
    assert not follower.done()  # it waits for more
    with (tmp_path / f"{VM}.log").open("a") as fh:
        fh.write("ial\n")
    logs.end(VM)
    assert await asyncio.wait_for(follower, 10) == ["one", "two", "partial"]


async def test_a_dump_of_a_log_without_a_newline_at_its_end(tmp_path: Path) -> None:
    (tmp_path / f"{VM}.log").write_text("a\nlast")
    assert await _read(AppLogFiles(tmp_path)) == ["a", "last"]


async def test_end_makes_the_folder_and_stops_the_pump(tmp_path: Path) -> None:
    logs = AppLogFiles(tmp_path / "not-yet")
    started = asyncio.Event()
    logs.pump(VM, _forever(started))
    await started.wait()
    task = logs._pumps[VM]
    logs.end(VM)
    assert (tmp_path / "not-yet" / f"{VM}.end").exists()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_new_pump_replaces_the_old_one(tmp_path: Path) -> None:
    logs = AppLogFiles(tmp_path)
    started = asyncio.Event()
    logs.pump(VM, _forever(started))
    await started.wait()
    old = logs._pumps[VM]
    logs.pump(VM, _source(b"after resume\n"))
    with pytest.raises(asyncio.CancelledError):
        await old
    await logs.drain(VM)
    assert await _read(logs) == ["after resume"]


async def test_a_drain_that_does_not_finish_in_time_cancels_the_pump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(applogs, "DRAIN_TIMEOUT", 0.01)
    logs = AppLogFiles(tmp_path)
    started = asyncio.Event()
    logs.pump(VM, _forever(started))
    await started.wait()
    task = logs._pumps[VM]
    await logs.drain(VM)
    await asyncio.sleep(0)
    assert task.cancelled()
    await logs.drain(VM)  # nothing left to drain: no error


async def test_close_cancels_every_pump(tmp_path: Path) -> None:
    logs = AppLogFiles(tmp_path)
    events = [asyncio.Event(), asyncio.Event()]
    ids = [VM, "mvm-" + "f" * 20]
    for vm_id, started in zip(ids, events, strict=True):
        logs.pump(vm_id, _forever(started))
    for started in events:
        await started.wait()
    tasks = list(logs._pumps.values())
    await logs.close()
    assert all(task.cancelled() for task in tasks)
    assert logs._pumps == {}


async def test_keep_pruning_prunes_then_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs = AppLogFiles(tmp_path, retention=0)
    (tmp_path / f"{VM}.log").write_text("x\n")
    (tmp_path / f"{VM}.end").touch()
    old = os.stat(tmp_path / f"{VM}.end").st_mtime - 10
    os.utime(tmp_path / f"{VM}.end", (old, old))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        raise asyncio.CancelledError

    # Only the module's view of asyncio: other tasks of the loop keep the real sleep.
    monkeypatch.setattr(
        applogs, "asyncio", SimpleNamespace(sleep=sleep, to_thread=asyncio.to_thread)
    )
    with pytest.raises(asyncio.CancelledError):
        await logs.keep_pruning()
    assert slept == [applogs.PRUNE_EVERY]
    assert os.listdir(tmp_path) == []


def test_prune_skips_markers_that_name_no_microvm(tmp_path: Path) -> None:
    (tmp_path / "notes.end").touch()
    os.utime(tmp_path / "notes.end", (0, 0))
    assert AppLogFiles(tmp_path, retention=0).prune() == 0
    assert (tmp_path / "notes.end").exists()

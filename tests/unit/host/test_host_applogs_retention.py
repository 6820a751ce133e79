"""App logs of ended MicroVMs are deleted after the retention; live ones never are."""

from __future__ import annotations

import os
import time
from pathlib import Path

from embervm.host.applogs import AppLogFiles

ENDED_LONG_AGO = "mvm-" + "a" * 20
ENDED_RECENTLY = "mvm-" + "b" * 20
STILL_RUNNING = "mvm-" + "c" * 20


def write_logs(root: Path, microvm_id: str, *, ended_at: float | None) -> None:
    (root / f"{microvm_id}.log").write_text("line\n")
    (root / f"{microvm_id}.log.1").write_text("older\n")
    if ended_at is not None:
        marker = root / f"{microvm_id}.end"
        marker.touch()
        os.utime(marker, (ended_at, ended_at))


def test_prune_deletes_only_vms_that_ended_before_the_retention(tmp_path: Path) -> None:
    now = time.time()
    logs = AppLogFiles(tmp_path, retention=3600)
    write_logs(tmp_path, ENDED_LONG_AGO, ended_at=now - 7200)
    write_logs(tmp_path, ENDED_RECENTLY, ended_at=now - 60)
    write_logs(tmp_path, STILL_RUNNING, ended_at=None)
    (tmp_path / "notes.end").touch()  # not a VM's marker: left alone
    os.utime(tmp_path / "notes.end", (0, 0))
    assert logs.prune(now) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f"{ENDED_RECENTLY}.log",
            f"{ENDED_RECENTLY}.log.1",
            f"{ENDED_RECENTLY}.end",
            f"{STILL_RUNNING}.log",
            f"{STILL_RUNNING}.log.1",
            "notes.end",
        ]
    )
    assert logs.prune(now + 3600) == 1  # the recent one's turn
    assert not (tmp_path / f"{ENDED_RECENTLY}.log").exists()


async def test_logs_of_a_pruned_vm_read_as_empty(tmp_path: Path) -> None:
    logs = AppLogFiles(tmp_path, retention=0)
    write_logs(tmp_path, ENDED_LONG_AGO, ended_at=time.time() - 10)
    assert [line async for line in logs.lines(ENDED_LONG_AGO, follow=False)] == ["line"]
    assert logs.prune() == 1
    assert [line async for line in logs.lines(ENDED_LONG_AGO, follow=False)] == []


def test_prune_of_a_missing_folder_is_nothing(tmp_path: Path) -> None:
    assert AppLogFiles(tmp_path / "none").prune() == 0

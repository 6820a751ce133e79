"""``host/_leftovers.py``: the VMMs of a dead server run found by their command line, killed,
and their VM directories removed. The "VMMs" here are sleeping Python processes whose
command line looks like QEMU's (no QEMU, no VM)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embervm.host import _leftovers
from embervm.host._leftovers import kill_vmms, reclaim_vm_dirs, vmm_pids

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``spawn(*args)``: a process sleeping with ``args`` on its command line."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(120)", *args],
            stdin=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _qemu(workdir: Path) -> tuple[str, ...]:
    return ("qemu-system-x86_64", "-qmp", f"unix:{workdir}/qmp.sock,server=on")


def test_the_vmms_of_a_directory_are_found_by_their_command_line(
    tmp_path: Path, spawn: Spawn
) -> None:
    vm = tmp_path / "vm1"
    mine = spawn(*_qemu(vm))
    spawn(*_qemu(tmp_path / "vm10"))  # a name that starts with vm1 is another VM
    spawn("not-a-vmm", f"{vm}/disk.qcow2")  # names the folder, but is no VMM
    spawn(*_qemu(tmp_path / "other"))
    assert vmm_pids(vm) == [mine.pid]


def test_a_directory_without_vmms_has_none(tmp_path: Path) -> None:
    assert vmm_pids(tmp_path / "nobody") == []


@pytest.mark.parametrize(
    ("stat", "zombie"),
    [
        (b"123 (qemu-system-x86) Z 1 123 123", True),
        (b"123 (qemu-system-x86) S 1 123 123", False),
        (b"123 (odd) Z name) R 1 2 3", False),  # the name may hold ") Z"
        (b"123 (odd) R name) Z 1 2 3", True),
    ],
)
def test_zombies_are_told_by_the_state_after_the_name(
    tmp_path: Path, stat: bytes, zombie: bool
) -> None:
    (tmp_path / "stat").write_bytes(stat)
    assert _leftovers._zombie(tmp_path) is zombie


def test_kill_vmms_kills_only_that_directorys_vmms(tmp_path: Path, spawn: Spawn) -> None:
    doomed = [spawn(*_qemu(tmp_path / "vm")), spawn(*_qemu(tmp_path / "vm"))]
    spared = spawn(*_qemu(tmp_path / "kept"))
    assert sorted(kill_vmms(tmp_path / "vm")) == sorted(p.pid for p in doomed)
    assert [p.wait(timeout=10) for p in doomed] == [-9, -9]
    assert spared.poll() is None


async def test_reclaim_removes_every_directory_not_kept_and_kills_its_vmms(
    tmp_path: Path, spawn: Spawn
) -> None:
    root = tmp_path / "vms"
    for name in ("a", "b", "c"):
        (root / name / "suspend").mkdir(parents=True)
        (root / name / "suspend" / "memory").write_bytes(b"x")
    leftover = spawn(*_qemu(root / "a"))
    held = spawn(*_qemu(root / "b"))
    assert await reclaim_vm_dirs(root, {"b"}) == ["a", "c"]
    assert sorted(p.name for p in root.iterdir()) == ["b"]
    assert (root / "b" / "suspend" / "memory").exists()
    assert leftover.wait(timeout=10) == -9
    assert held.poll() is None


async def test_reclaim_of_a_missing_root_is_nothing(tmp_path: Path) -> None:
    assert await reclaim_vm_dirs(tmp_path / "absent", set()) == []

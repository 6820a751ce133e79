"""A booted QEMU microvm (TCG) for the guest tests, on a command line written out here.

Imported by the guest test modules by this unique name (a second ``conftest`` module name would
clash with other areas' conftests when the whole tree runs).

This is the boot recipe of docs/GUEST_PROTOCOL.md as a plain QEMU command line, launched directly
(the runtime's command line is ``embervm.vmm.cmdline``): the guest tests need a real VM but not the
VMM layer. Every test connects its own ``AgentClient`` to the same VM, which exercises the reconnect
path (each new ``hello`` resets the previous connection's sessions).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from embervm.guest.artifacts import GuestArtifacts, host_tsc_khz, kernel_cmdline

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class BootedVm:
    proc: subprocess.Popen[bytes]
    agent_socket: Path
    console_log: Path
    artifacts: GuestArtifacts
    started: float  # time.monotonic() when QEMU was spawned


def qemu_argv(art: GuestArtifacts, workdir: Path) -> list[str]:
    tsc = host_tsc_khz()
    machine = "microvm,pit=off,pic=off" if tsc is not None else "microvm"
    cmdline = kernel_cmdline(guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=tsc)
    return [
        QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-M", machine, "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "1", "-m", "256M",
        "-kernel", str(art.kernel), "-initrd", str(art.initrd), "-append", cmdline,
        "-serial", f"file:{workdir / 'console.log'}",
        "-drive", f"id=d0,file={workdir / 'disk.qcow2'},format=qcow2,if=none,cache=unsafe",
        "-device", "virtio-blk-device,drive=d0",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.embervm.agent",
        "-netdev", "user,id=n0,restrict=on",
        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def booted_vm(
    guest_artifacts: GuestArtifacts, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BootedVm]:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    workdir = tmp_path_factory.mktemp("vm")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
         "-b", str(guest_artifacts.base_disk), str(workdir / "disk.qcow2")],
        check=True,
    )  # fmt: skip
    started = time.monotonic()
    with open(workdir / "qemu.stderr", "wb") as stderr:
        proc = subprocess.Popen(
            qemu_argv(guest_artifacts, workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        yield BootedVm(proc, workdir / "agent.sock", workdir / "console.log", guest_artifacts,
                       started)  # fmt: skip
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        console = workdir / "console.log"
        if console.exists():
            tail = console.read_text(errors="replace")[-2000:]
            if tail.strip():
                sys.stderr.write(f"--- guest console ---\n{tail}\n")

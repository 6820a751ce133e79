"""Finding what a dead server run left on this host: the VMMs of a VM directory, and VM
directories nobody holds any more.

QEMU processes are started in their own session so they outlive the server (a restart
re-attaches running VMs). After a crash, the next start must therefore find them by what they
were started with: every VMM's command line names its working directory (QMP socket, disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from pathlib import Path

#: What every VMM's command line contains (``qemu-system-<arch>``).
VMM_BINARY_MARK = b"qemu-system"


def vmm_pids(workdir: Path) -> list[int]:
    """Live QEMU processes whose command line names ``workdir`` (zombies excluded)."""
    needle = str(workdir).encode() + b"/"
    found: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if VMM_BINARY_MARK in cmdline and needle in cmdline and not _zombie(proc):
                found.append(int(proc.name))
    return found


def _zombie(proc: Path) -> bool:
    stat = (proc / "stat").read_bytes()
    return stat.rsplit(b")", 1)[1].split()[0] == b"Z"


def kill_vmms(workdir: Path) -> list[int]:
    """SIGKILL every VMM of ``workdir``; returns their pids."""
    pids = vmm_pids(workdir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _entries(root: Path) -> list[Path]:
    return sorted(root.iterdir()) if root.is_dir() else []


async def reclaim_vm_dirs(root: Path, keep: set[str]) -> list[str]:
    """Kill the VMMs of every directory in ``root`` not named in ``keep`` and remove the
    directories; returns the names removed."""
    removed: list[str] = []
    for entry in await asyncio.to_thread(_entries, root):
        if entry.name in keep:
            continue
        await asyncio.to_thread(kill_vmms, entry)
        await asyncio.to_thread(shutil.rmtree, entry, True)
        removed.append(entry.name)
    return removed

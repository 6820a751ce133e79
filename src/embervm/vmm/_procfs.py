"""The few Linux /proc and pidfd facts the VMM needs, in one place."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from embervm.errors import VmmError
from embervm.vmm.config import VmStats


def read_stats(pid: int, proc: Path = Path("/proc")) -> VmStats:
    """RSS/PSS/private memory from ``smaps_rollup`` and user+system CPU time from ``stat``."""
    try:
        rollup = (proc / str(pid) / "smaps_rollup").read_text()
        stat = (proc / str(pid) / "stat").read_text()
    except OSError as exc:
        raise VmmError(f"no stats for pid {pid}: {exc}") from exc
    kb: dict[str, int] = {}
    for line in rollup.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            kb[key.strip()] = int(parts[0])
    # Field 2 (comm) may contain spaces: split after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return VmStats(
        pid=pid,
        rss_bytes=kb.get("Rss", 0) * 1024,
        pss_bytes=kb.get("Pss", 0) * 1024,
        private_bytes=(kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024,
        cpu_seconds=cpu,
    )


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


async def wait_pidfd(pid: int) -> None:
    """Wait until a process that is not our child exits (pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as exc:
        raise VmmError(f"cannot watch pid {pid}: {exc}") from exc
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True

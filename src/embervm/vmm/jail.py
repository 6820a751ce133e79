"""The VMM jail: one cgroup per QEMU process with CPU and memory limits, v1 or v2.

Hosts differ: most users' hosts mount the unified cgroup v2 hierarchy at ``/sys/fs/cgroup``;
the development machines mount ``cpu`` and ``memory`` as separate v1 hierarchies. One small
interface (``CgroupDriver.create`` → ``Cgroup``) hides which; ``detect_cgroup_driver`` picks.

A process joins its cgroup *before* QEMU runs: ``launch_prefix`` is a ``/bin/sh`` one-liner that
writes its own pid into each ``cgroup.procs`` and then ``exec``s the VMM (same pid), so no
instant of the VMM's life is outside its limits and no ``preexec_fn`` runs in a threaded parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from embervm.errors import JailError
from embervm.vmm.config import CgroupLimits

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PARENT = "embervm"
CFS_PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# Join every cgroup.procs given as arguments up to "--", then exec the rest.
_JOIN_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@"'


@dataclass(frozen=True)
class Cgroup:
    """One VMM's cgroup: a directory per hierarchy (one for v2, cpu + memory for v1)."""

    name: str
    dirs: tuple[Path, ...]

    def launch_prefix(self) -> list[str]:
        """argv prefix that moves the process into this cgroup, then execs the rest."""
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", _JOIN_SCRIPT, "embervm-cgroup-join", *procs, "--"]

    def add_pid(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found |= {int(x) for x in (d / "cgroup.procs").read_text().split()}
        return found

    def destroy(self) -> None:
        """Remove the cgroup dirs (only empty cgroups can go; a live member is an error)."""
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise JailError(f"cgroup {d} still has processes") from exc
                if exc.errno != errno.ENOTEMPTY:
                    raise JailError(f"cannot remove cgroup {d}: {exc}") from exc
                # A plain directory standing in for cgroupfs (tests) holds real files; on
                # cgroupfs ENOTEMPTY means child cgroups, and unlinking fails below.
                try:
                    for f in d.iterdir():
                        f.unlink()
                    d.rmdir()
                except OSError as exc2:
                    raise JailError(f"cannot remove cgroup {d}: {exc2}") from exc2


class CgroupDriver(Protocol):
    version: int

    def create(self, name: str, limits: CgroupLimits) -> Cgroup: ...

    def existing(self, name: str) -> Cgroup | None: ...


class CgroupV2:
    """Unified hierarchy: ``<root>/embervm/<name>/{cpu.max,memory.max}``."""

    version = 2

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def _parent(self) -> Path:
        parent = self.root / PARENT
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise JailError(f"cannot create {parent}: {exc}") from exc
        # Controllers must be enabled from the root down to the parent of the leaves.
        for d in (self.root, parent):
            ctl = d / "cgroup.subtree_control"
            enabled = set(ctl.read_text().split()) if ctl.exists() else set()
            missing = {"cpu", "memory"} - enabled
            if missing:
                _write(ctl, " ".join(f"+{c}" for c in sorted(missing)))
        return parent

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        d = self._parent() / _checked(name)
        _mkdir(d)
        quota = int((limits.cpu_quota_cores or 1.0) * CFS_PERIOD_US)
        _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if limits.memory_max_mib:
            _write(d / "memory.max", str(limits.memory_max_mib << 20))
            with contextlib.suppress(JailError):
                _write(d / "memory.swap.max", "0")
        return Cgroup(name, (d,))

    def existing(self, name: str) -> Cgroup | None:
        d = self.root / PARENT / _checked(name)
        return Cgroup(name, (d,)) if d.is_dir() else None


class CgroupV1:
    """Split hierarchies: ``<root>/cpu/embervm/<name>/cpu.cfs_*`` and ``<root>/memory/...``."""

    version = 1

    def __init__(self, cpu_root: Path, memory_root: Path) -> None:
        self.cpu_root = cpu_root
        self.memory_root = memory_root

    def _dirs(self, name: str) -> tuple[Path, Path]:
        n = _checked(name)
        return self.cpu_root / PARENT / n, self.memory_root / PARENT / n

    def create(self, name: str, limits: CgroupLimits) -> Cgroup:
        cpu, mem = self._dirs(name)
        for d in (cpu, mem):
            _mkdir(d.parent, exist_ok=True)
            _mkdir(d)
        quota = int((limits.cpu_quota_cores or 1.0) * CFS_PERIOD_US)
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.memory_max_mib:
            _write(mem / "memory.limit_in_bytes", str(limits.memory_max_mib << 20))
        return Cgroup(name, (cpu, mem))

    def existing(self, name: str) -> Cgroup | None:
        dirs = self._dirs(name)
        return Cgroup(name, dirs) if all(d.is_dir() for d in dirs) else None


def detect_cgroup_driver(
    *, root: Path = DEFAULT_ROOT, mounts: Path = Path("/proc/mounts")
) -> CgroupDriver:
    """v2 when ``<root>`` is the unified hierarchy (it has ``cgroup.controllers``) with cpu and
    memory; else v1 from the ``cpu`` and ``memory`` mounts listed in ``mounts``."""
    ctl = root / "cgroup.controllers"
    if ctl.exists():
        have = set(ctl.read_text().split())
        if {"cpu", "memory"} <= have:
            return CgroupV2(root)
        raise JailError(f"cgroup v2 at {root} lacks cpu/memory controllers (has {sorted(have)})")
    cpu_root = mem_root = None
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise JailError(f"cannot read {mounts}: {exc}") from exc
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        opts = set(parts[3].split(","))
        if "cpu" in opts and cpu_root is None:
            cpu_root = Path(parts[1])
        if "memory" in opts and mem_root is None:
            mem_root = Path(parts[1])
    if cpu_root is None or mem_root is None:
        raise JailError("no cgroup v2 with cpu+memory and no cgroup v1 cpu and memory mounts")
    return CgroupV1(cpu_root, mem_root)


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise JailError(f"bad cgroup name {name!r}")
    return name


def _mkdir(d: Path, *, exist_ok: bool = True) -> None:
    try:
        d.mkdir(exist_ok=exist_ok)
    except OSError as exc:
        raise JailError(f"cannot create cgroup {d}: {exc}") from exc


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise JailError(f"cannot write {value!r} to {path}: {exc}") from exc

"""The VMM jail: one cgroup per QEMU process with CPU, memory, task and disk I/O limits (v1 or
v2), and the unprivileged uid each QEMU drops to (docs/JAIL.md).

Hosts differ: most users' hosts mount the unified cgroup v2 hierarchy at ``/sys/fs/cgroup``;
the development machines mount ``cpu``, ``memory``, ``pids`` and ``blkio`` as separate v1
hierarchies. One small interface (``CgroupDriver.create`` → ``Cgroup``) hides which;
``detect_cgroup_driver`` picks. On v1 the ``pids`` and ``blkio`` hierarchies are used when
mounted (a host without them still gets CPU and memory limits).

A process joins its cgroup *before* QEMU runs: ``launch_prefix`` is a ``/bin/sh`` one-liner that
writes its own pid into each ``cgroup.procs`` and then ``exec``s the VMM (same pid), so no
instant of the VMM's life is outside its limits and no ``preexec_fn`` runs in a threaded parent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from embervm.errors import JailError
from embervm.vmm.config import CgroupLimits

DEFAULT_ROOT = Path("/sys/fs/cgroup")
PARENT = "embervm"
CFS_PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: v2 controllers a VM's cgroup uses; ``io`` only where the kernel offers it.
_V2_CONTROLLERS = ("cpu", "memory", "pids", "io")

BlockDevice = tuple[int, int]
"""A whole disk's ``major:minor``: what ``io.max`` and blkio throttles are keyed by."""

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

    def create(
        self, name: str, limits: CgroupLimits, *, io_device: BlockDevice | None = None
    ) -> Cgroup: ...

    def existing(self, name: str) -> Cgroup | None: ...


class CgroupV2:
    """Unified hierarchy: ``<root>/embervm/<name>/{cpu.max,memory.max}``."""

    version = 2

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = root

    def _parent(self) -> tuple[Path, set[str]]:
        """The ``embervm`` parent, with every controller it can have enabled for its leaves."""
        parent = self.root / PARENT
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            raise JailError(f"cannot create {parent}: {exc}") from exc
        offered = set((self.root / "cgroup.controllers").read_text().split())
        wanted = {c for c in _V2_CONTROLLERS if c in offered}
        # Controllers must be enabled from the root down to the parent of the leaves.
        for d in (self.root, parent):
            ctl = d / "cgroup.subtree_control"
            enabled = set(ctl.read_text().split()) if ctl.exists() else set()
            missing = wanted - enabled
            if missing:
                _write(ctl, " ".join(f"+{c}" for c in sorted(missing)))
        return parent, wanted

    def create(
        self, name: str, limits: CgroupLimits, *, io_device: BlockDevice | None = None
    ) -> Cgroup:
        parent, controllers = self._parent()
        d = parent / _checked(name)
        _mkdir(d)
        quota = int((limits.cpu_quota_cores or 1.0) * CFS_PERIOD_US)
        _write(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if limits.memory_max_mib:
            _write(d / "memory.max", str(limits.memory_max_mib << 20))
            with contextlib.suppress(JailError):
                _write(d / "memory.swap.max", "0")
        if limits.pids_max and "pids" in controllers:
            _write(d / "pids.max", str(limits.pids_max))
        if io_device is not None and "io" in controllers:
            rules = _io_max_rule(limits)
            if rules:
                _write(d / "io.max", f"{io_device[0]}:{io_device[1]} {rules}")
        return Cgroup(name, (d,))

    def existing(self, name: str) -> Cgroup | None:
        d = self.root / PARENT / _checked(name)
        return Cgroup(name, (d,)) if d.is_dir() else None


class CgroupV1:
    """Split hierarchies: ``<root>/cpu/embervm/<name>/cpu.cfs_*``, ``<root>/memory/...``, and
    when mounted ``<root>/pids/...`` (``pids.max``) and ``<root>/blkio/...`` (throttles)."""

    version = 1

    def __init__(
        self,
        cpu_root: Path,
        memory_root: Path,
        *,
        pids_root: Path | None = None,
        blkio_root: Path | None = None,
    ) -> None:
        self.cpu_root = cpu_root
        self.memory_root = memory_root
        self.pids_root = pids_root
        self.blkio_root = blkio_root

    def _dirs(self, name: str) -> tuple[Path, ...]:
        n = _checked(name)
        roots = (self.cpu_root, self.memory_root, self.pids_root, self.blkio_root)
        return tuple(r / PARENT / n for r in roots if r is not None)

    def create(
        self, name: str, limits: CgroupLimits, *, io_device: BlockDevice | None = None
    ) -> Cgroup:
        dirs = self._dirs(name)
        for d in dirs:
            _mkdir(d.parent, exist_ok=True)
            _mkdir(d)
        cpu, mem = dirs[0], dirs[1]
        quota = int((limits.cpu_quota_cores or 1.0) * CFS_PERIOD_US)
        _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.memory_max_mib:
            _write(mem / "memory.limit_in_bytes", str(limits.memory_max_mib << 20))
        if self.pids_root is not None and limits.pids_max:
            _write(self.pids_root / PARENT / name / "pids.max", str(limits.pids_max))
        if self.blkio_root is not None and io_device is not None:
            blkio = self.blkio_root / PARENT / name
            device = f"{io_device[0]}:{io_device[1]}"
            for way in ("read", "write"):
                if limits.io_bytes_per_second:
                    rule = f"{device} {limits.io_bytes_per_second}"
                    _write(blkio / f"blkio.throttle.{way}_bps_device", rule)
                if limits.io_ops_per_second:
                    rule = f"{device} {limits.io_ops_per_second}"
                    _write(blkio / f"blkio.throttle.{way}_iops_device", rule)
        return Cgroup(name, dirs)

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
    try:
        lines = mounts.read_text().splitlines()
    except OSError as exc:
        raise JailError(f"cannot read {mounts}: {exc}") from exc
    found: dict[str, Path] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        for controller in set(parts[3].split(",")) & {"cpu", "memory", "pids", "blkio"}:
            found.setdefault(controller, Path(parts[1]))
    if "cpu" not in found or "memory" not in found:
        raise JailError("no cgroup v2 with cpu+memory and no cgroup v1 cpu and memory mounts")
    return CgroupV1(
        found["cpu"], found["memory"], pids_root=found.get("pids"), blkio_root=found.get("blkio")
    )


def _io_max_rule(limits: CgroupLimits) -> str:
    rules = []
    if limits.io_bytes_per_second:
        rules += [f"rbps={limits.io_bytes_per_second}", f"wbps={limits.io_bytes_per_second}"]
    if limits.io_ops_per_second:
        rules += [f"riops={limits.io_ops_per_second}", f"wiops={limits.io_ops_per_second}"]
    return " ".join(rules)


def block_device_of(path: Path, sys_dev_block: Path = Path("/sys/dev/block")) -> BlockDevice | None:
    """The whole disk holding ``path``'s filesystem (a partition maps to its disk: the kernel
    throttles disks only), or None when that filesystem has no block device (tmpfs, btrfs
    subvolumes, overlayfs): then there is nothing to key an I/O limit by."""
    try:
        dev = path.stat().st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    node = sys_dev_block / f"{major}:{minor}"
    if major == 0 or not node.exists():
        return None
    if (node / "partition").exists():
        try:
            major, minor = (int(x) for x in (node / ".." / "dev").read_text().split(":"))
        except (OSError, ValueError):
            return None
    return major, minor


#: The uids (each its own gid) VMMs drop to: right after systemd's container range
#: (524288-1879048191), below 2^31; no passwd entry is needed (QEMU takes ``uid:gid``).
UID_BASE = 0x7000_0000
UID_SPAN = 0x1_0000
_claims_lock = threading.Lock()
_claimed: set[int] = set()


def uids_in_use(proc: Path = Path("/proc")) -> set[int]:
    """Every uid and gid a live process runs with (real, effective, saved, filesystem)."""
    found: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            for line in (entry / "status").read_text().splitlines():
                if line.startswith(("Uid:", "Gid:")):
                    found.update(int(x) for x in line.split()[1:])
    return found


@contextlib.contextmanager
def claimed_uid(seed: str, in_use: set[int]) -> Iterator[int]:
    """A uid of the VMM range that no live process (``in_use``: ``uids_in_use()``) and no
    other spawn in flight has, held until the block ends. The caller spawns QEMU inside the
    block and leaves it once QEMU runs under the uid (QMP answers only then), after which the
    ``/proc`` scan of any later claim sees it. The search starts at a hash of ``seed`` (the
    VM id), so a VM usually gets the same uid again."""
    digest = hashlib.blake2b(seed.encode(), digest_size=4).digest()
    start = int.from_bytes(digest, "big") % UID_SPAN
    with _claims_lock:
        for step in range(UID_SPAN):
            uid = UID_BASE + (start + step) % UID_SPAN
            if uid not in in_use and uid not in _claimed:
                _claimed.add(uid)
                break
        else:
            raise JailError(f"all {UID_SPAN} VMM uids from {UID_BASE} are in use")
    try:
        yield uid
    finally:
        with _claims_lock:
            _claimed.discard(uid)


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

"""What a VM is made of, as plain data: the VMM turns a ``VmConfig`` into a QEMU process."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]

#: Every guest has the same MAC (and address), so snapshots restore anywhere (docs/NETWORK.md).
GUEST_MAC = "52:54:00:12:34:56"
#: Name of the virtio-serial port the guest agent listens on.
AGENT_PORT_NAME = "org.embervm.agent"
#: Memory the QEMU process needs beyond guest RAM (TCG translation cache, devices, libraries).
DEFAULT_MEMORY_OVERHEAD_MIB = 192
#: Tasks (threads) one QEMU may have: vCPU threads, the main loop, RCU and up to 64 block I/O
#: workers fit well within it; ``spawn=deny`` already stops forks, this caps threads too.
DEFAULT_PIDS_MAX = 256
#: Disk bandwidth and operations per second one VMM may use on the data dir's device, each
#: way: enough for a guest's own work, too little for one guest to starve the others.
DEFAULT_IO_BYTES_PER_SECOND = 256 << 20
DEFAULT_IO_OPS_PER_SECOND = 8000


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits of one VMM process; ``None`` means "derive from the VM's size"."""

    cpu_quota_cores: float | None = None  # e.g. 1.0 = one core's worth of CPU time
    memory_max_mib: int | None = None  # hard limit for the whole QEMU process
    pids_max: int | None = None  # tasks (threads) of the QEMU process
    io_bytes_per_second: int | None = None  # read and write, each, on the data dir's disk
    io_ops_per_second: int | None = None  # read and write operations, each


@dataclass(frozen=True)
class VmConfig:
    """One VM's configuration: sizes, boot inputs and the paths of its per-VM files.

    Paths normally live in ``vms/<id>/`` (``for_workdir`` builds the standard layout). The
    same config boots a VM or restores one from a snapshot (then ``memory_mib`` and ``vcpus``
    must match the snapshot's, and kernel/initrd are the ones the snapshot was booted from).
    """

    vm_id: str
    workdir: Path
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    disk: Path  # qcow2 overlay; written by the guest
    memory_file: Path  # guest RAM (memory-backend-file), on disk, not /dev/shm
    agent_socket: Path
    qmp_socket: Path
    console_log: Path
    netns: str | None = None
    tap: str | None = None
    accel: Accel = "tcg"
    # "auto": multi-threaded TCG when vcpus > 1 (two busy guest loops on 2 vCPUs: 6.0 s vs
    # 11.2 s single-threaded here), single-threaded for one vCPU (nothing to gain).
    tcg_thread: Literal["auto", "single", "multi"] = "auto"
    cgroup: CgroupLimits | None = None  # None: no cgroup jail
    sandbox: bool = True  # QEMU's seccomp filter (-sandbox on,...)
    # QEMU drops to a uid of its own and chroots into ``workdir`` once its files are open
    # (needs root; docs/JAIL.md).
    unprivileged: bool = False
    kernel_release: str = ""  # recorded in snapshot manifests
    legacy_timers: bool = False  # keep PIT/PIC (only when the cmdline lacks tsc_early_khz)
    extra_args: tuple[str, ...] = field(default=())

    @classmethod
    def for_workdir(
        cls,
        vm_id: str,
        workdir: Path,
        *,
        memory_mib: int,
        vcpus: int,
        kernel: Path,
        initrd: Path,
        cmdline: str,
        **kwargs: object,
    ) -> VmConfig:
        """The standard per-VM layout: ``disk.qcow2``, ``memory``, ``qmp.sock``, ``agent.sock``."""
        return cls(
            vm_id=vm_id,
            workdir=workdir,
            memory_mib=memory_mib,
            vcpus=vcpus,
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            disk=workdir / "disk.qcow2",
            memory_file=workdir / "memory",
            agent_socket=workdir / "agent.sock",
            qmp_socket=workdir / "qmp.sock",
            console_log=workdir / "console.log",
            **kwargs,  # type: ignore[arg-type]
        )

    def with_changes(self, **changes: object) -> VmConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def effective_limits(self) -> CgroupLimits:
        """The cgroup limits with defaults filled in: a core per vCPU, RAM + overhead, and
        the task and disk I/O defaults above."""
        lim = self.cgroup or CgroupLimits()
        return CgroupLimits(
            cpu_quota_cores=lim.cpu_quota_cores or float(self.vcpus),
            memory_max_mib=lim.memory_max_mib or self.memory_mib + DEFAULT_MEMORY_OVERHEAD_MIB,
            pids_max=lim.pids_max or DEFAULT_PIDS_MAX,
            io_bytes_per_second=lim.io_bytes_per_second or DEFAULT_IO_BYTES_PER_SECOND,
            io_ops_per_second=lim.io_ops_per_second or DEFAULT_IO_OPS_PER_SECOND,
        )


@dataclass(frozen=True)
class VmStats:
    """Host-side cost of one VMM process (from ``/proc/<pid>``)."""

    pid: int
    rss_bytes: int
    pss_bytes: int
    private_bytes: int  # Private_Clean + Private_Dirty
    cpu_seconds: float  # user + system

"""The QEMU command line of a microVM, as a pure function of a ``VmConfig``.

Kept pure so unit tests can pin every flag: the boot-hang fix (``pit=off,pic=off``, which needs
``tsc_early_khz`` in the kernel command line: docs/GUEST_PROTOCOL.md), the RAM in a
``memory-backend-file`` (what makes snapshots cheap: docs/SNAPSHOTS.md), the agent port QEMU
serves, the seccomp sandbox, the privilege drop and the serial console written into a pipe
(docs/JAIL.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embervm.vmm.config import AGENT_PORT_NAME, GUEST_MAC, VmConfig

QEMU_BINARY = "qemu-system-x86_64"
RAM_BACKEND = "ram0"
"""The guest RAM's memory backend id: also the RAM block's name in migration streams."""
DISK_FDSET = 1
"""The fd set holding the disk's descriptors (QMP ``add-fd`` numbers later sets after it)."""
SERIAL_FDSET = 2
"""The fd set holding the write end of the serial console's pipe."""
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# QEMU loads its filter before it drops privileges, so with ``elevateprivileges=deny`` its own
# setgid() is killed (SIGSYS). Once dropped, QEMU has no capability left to elevate with: a
# non-root process can set no id but its own, and it cannot exec (spawn=deny).
SANDBOX_DROPPING = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"

DropFlags = Literal["runas-chroot", "runas-run-with-chroot", "run-with"]
"""How this QEMU spells the privilege drop: ``-runas``/``-chroot`` (up to 8.0), ``-runas`` with
``-run-with chroot=`` (8.1 to 9.0, where ``-chroot`` is deprecated), ``-run-with user=,chroot=``
(9.1 on, where ``-runas`` is deprecated)."""


def drop_flags_from_help(help_text: str) -> DropFlags:
    """Read from ``qemu-system-x86_64 -help`` which spelling this binary takes."""
    run_with = re.search(r"^-run-with\b(.*)$", help_text, re.MULTILINE)
    if run_with is None or "chroot=" not in run_with.group(1):
        return "runas-chroot"
    return "run-with" if "user=" in run_with.group(1) else "runas-run-with-chroot"


@dataclass(frozen=True)
class PrivilegeDrop:
    """Who QEMU becomes once its devices and files are open: ``uid``:``uid`` with no other
    group and no capability, chrooted into ``chroot`` (the VM's directory, root's 0700)."""

    uid: int
    chroot: Path
    flags: DropFlags = "runas-chroot"

    def argv(self) -> list[str]:
        user = f"{self.uid}:{self.uid}"
        if self.flags == "run-with":
            return ["-run-with", f"user={user},chroot={self.chroot}"]
        if self.flags == "runas-run-with-chroot":
            return ["-runas", user, "-run-with", f"chroot={self.chroot}"]
        return ["-runas", user, "-chroot", str(self.chroot)]


@dataclass(frozen=True)
class MemorySpec:
    """How guest RAM is mapped: ``share=True`` writes through to the file (MAP_SHARED),
    ``share=False`` maps it copy-on-write (MAP_PRIVATE); ``path=None`` is anonymous memory
    (``memory-backend-ram``: untouched pages cost nothing, not even when read)."""

    path: Path | None
    share: bool = True


def machine_option(cfg: VmConfig) -> str:
    base = "microvm" if cfg.legacy_timers else "microvm,pit=off,pic=off"
    return f"{base},memory-backend={RAM_BACKEND}"


def accel_option(cfg: VmConfig) -> str:
    if cfg.accel == "kvm":
        return "kvm"
    thread = cfg.tcg_thread
    if thread == "auto":
        thread = "multi" if cfg.vcpus > 1 else "single"
    return f"tcg,thread={thread}"


def qemu_argv(
    cfg: VmConfig,
    *,
    memory: MemorySpec | None = None,
    incoming: bool = False,
    binary: str = QEMU_BINARY,
    serial_fd: int | None = None,
    disk_fds: tuple[int, int] | None = None,
    drop: PrivilegeDrop | None = None,
) -> list[str]:
    """The full argv (binary first). ``incoming`` adds ``-incoming defer`` for restores.
    ``serial_fd``: the console goes to this inherited descriptor (a pipe the VMM drains)
    instead of ``cfg.console_log``. ``disk_fds``: inherited read-write and read-only
    descriptors of ``cfg.disk``, opened as fd set ``DISK_FDSET`` (QEMU names no path when the
    disk later becomes a read-only backing file). ``drop``: the privilege drop (and a sandbox
    that lets QEMU perform it)."""
    mem = memory or MemorySpec(cfg.memory_file)
    # QEMU opens the console before it drops privileges, as root, outside its chroot. An
    # inherited pipe goes in as an fd set (a jailed QEMU's mount namespace has no /proc),
    # appended to: a truncating open of an fd set member truncates it, which a pipe refuses.
    if serial_fd is None:
        serial = ["-serial", f"file:{cfg.console_log}"]
    else:
        serial = ["-chardev", f"file,id=console,path=/dev/fdset/{SERIAL_FDSET},append=on",
                  "-serial", "chardev:console"]  # fmt: skip
    disk = cfg.disk if disk_fds is None else Path(f"/dev/fdset/{DISK_FDSET}")
    if mem.path is None:
        backend = f"memory-backend-ram,id={RAM_BACKEND},size={cfg.memory_mib}M"
    else:
        backend = (
            f"memory-backend-file,id={RAM_BACKEND},size={cfg.memory_mib}M,mem-path={mem.path},"
            f"share={'on' if mem.share else 'off'}"
        )
    argv = [
        binary, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-name", f"embervm-{cfg.vm_id},debug-threads=on",
        "-M", machine_option(cfg), "-accel", accel_option(cfg), "-cpu", "max",
        "-smp", str(cfg.vcpus), "-m", f"{cfg.memory_mib}M",
        "-object", backend,
        "-kernel", str(cfg.kernel), "-initrd", str(cfg.initrd), "-append", cfg.cmdline,
        *serial,
        "-qmp", f"unix:{cfg.qmp_socket},server=on,wait=off",
        # auto-read-only=off: the disk is opened read-write at once; otherwise an incoming
        # migration opens it read-only and `cont` opens it again. No file locks: the fd set
        # keeps the read-write description open, so its lock would outlive a freeze (see
        # QemuProcess.switch_disk_overlay); which VM writes which file is the VMM's to say.
        "-drive", f"id=d0,file={disk},format=qcow2,if=none,cache=unsafe,discard=unmap,"
                  "auto-read-only=off,file.locking=off",
        "-device", "virtio-blk-device,drive=d0",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={cfg.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]  # fmt: skip
    # Every VM has the same devices (a snapshot taken with a tap restores without one and
    # back): without a tap the NIC sits on an empty hub (slirp would add migration state).
    if cfg.tap is not None:
        netdev = f"tap,id=n0,ifname={cfg.tap},script=no,downscript=no,vhost=off"
    else:
        netdev = "hubport,id=n0,hubid=0"
    argv += ["-netdev", netdev, "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"]
    for fd in disk_fds or ():
        argv += ["-add-fd", f"fd={fd},set={DISK_FDSET}"]
    if serial_fd is not None:
        argv += ["-add-fd", f"fd={serial_fd},set={SERIAL_FDSET}"]
    if cfg.sandbox:
        argv += ["-sandbox", SANDBOX if drop is None else SANDBOX_DROPPING]
    if drop is not None:
        argv += drop.argv()
    if incoming:
        argv += ["-incoming", "defer"]
    argv += list(cfg.extra_args)
    return argv

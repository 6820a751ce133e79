"""``QemuVmm``: boots, restores and re-attaches QEMU ``microvm`` processes.

Launch chain (each link ``exec``s the next, so the pid the caller sees is QEMU's):
``/bin/sh`` joining the VM's cgroup → ``ip netns exec <netns>`` (when the VM has a netns) →
``python -c`` entering the jail's mount namespace (``rootview``) and loading a second seccomp
filter (``seccomp``; both in ``launchstep``) → ``qemu-system-x86_64 ...`` with its own seccomp
sandbox. An ``unprivileged`` VM's QEMU opens its
files as root, then drops to a uid of its own and chroots into the VM's directory, where it
can open nothing (docs/JAIL.md). QEMU opens no file after that: the VMM passes migration
files and new disk overlays as file descriptors over QMP, so ``spawn=deny`` and the chroot
hold. The serial console and stderr go into pipes drained into bounded logs (``logcap``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from embervm.errors import EmbervmError, JailError, SnapshotError, VmmError
from embervm.vmm import _procfs, launchstep, rootview, seccomp
from embervm.vmm import snapshot as snap
from embervm.vmm.api import Vmm, VmProcess
from embervm.vmm.cmdline import (
    QEMU_BINARY,
    SANDBOX_DROPPING,
    DropFlags,
    MemorySpec,
    PrivilegeDrop,
    drop_flags_from_help,
    qemu_argv,
)
from embervm.vmm.config import VmConfig
from embervm.vmm.disks import create_overlay, disk_descriptors
from embervm.vmm.jail import (
    Cgroup,
    CgroupDriver,
    block_device_of,
    claimed_uid,
    detect_cgroup_driver,
    uids_in_use,
)
from embervm.vmm.logcap import PipeLog
from embervm.vmm.process import LOG_DRAIN_TIMEOUT, MIGRATION_TIMEOUT, QemuProcess
from embervm.vmm.qmp import Qmp, migrate_from_file, set_migration_caps

log = logging.getLogger("embervm.vmm")

START_TIMEOUT = 15.0
STDERR_LOG = "qemu.stderr"


def _qemu_says(binary: str, flag: str) -> str:
    """What ``binary flag`` prints (``--version``, ``-help``), or VmmError."""
    try:
        return subprocess.run(
            [binary, flag], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise VmmError(f"cannot run {binary} {flag}: {exc}") from exc


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """``7.2.22`` from ``qemu-system-x86_64 --version``."""
    out = _qemu_says(binary, "--version")
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise VmmError(f"cannot parse QEMU version from {out!r}")
    return m.group(1)


def qemu_drop_flags(binary: str = QEMU_BINARY) -> DropFlags:
    """How ``binary`` spells the privilege drop, read from its ``-help``."""
    return drop_flags_from_help(_qemu_says(binary, "-help"))


def probe_jail(binary: str = QEMU_BINARY) -> None:
    """Start ``binary`` the way every VMM is jailed (its own mount namespace, the seccomp
    allow-list, QEMU's sandbox, the uid drop and chroot) with no machine, have it answer QMP
    on stdin and quit; VmmError saying what failed otherwise. Needs root."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="embervm-jail-probe-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o700)
        with claimed_uid("jail-probe", uids_in_use()) as uid:
            drop = PrivilegeDrop(uid, workdir, qemu_drop_flags(binary))
            argv = [
                *launchstep.launch_prefix(seccomp_filter=seccomp.program(),
                                          mounts=rootview.base_view(workdir, binary)),
                binary, "-M", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio",
                "-sandbox", SANDBOX_DROPPING, *drop.argv(),
            ]  # fmt: skip
            qmp = '{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'
            try:
                done = subprocess.run(argv, input=qmp, capture_output=True, text=True,
                                      timeout=30, check=False)  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                raise VmmError(f"a jailed {binary} did not run: {exc}") from exc
    if done.returncode != 0 or '"return"' not in done.stdout:
        said = (done.stderr.strip() or done.stdout.strip())[-300:]
        raise VmmError(f"a jailed {binary} exited with {done.returncode}: {said}")


class QemuVmm:
    """The QEMU implementation of ``embervm.vmm.api.Vmm``.

    ``cgroups``: the host's cgroup driver (``jail.detect_cgroup_driver()``); used for every VM
    whose config has ``cgroup`` limits. ``start_timeout`` bounds spawning until QMP answers.
    ``stream_restore_shared``: load a ``stream`` snapshot into a shared RAM file (later suspends
    then write only dirty pages) instead of a private mapping (see docs/SNAPSHOTS.md).
    """

    def __init__(
        self,
        *,
        cgroups: CgroupDriver | None = None,
        binary: str = QEMU_BINARY,
        start_timeout: float = START_TIMEOUT,
        stream_restore_shared: bool = False,
    ) -> None:
        self.cgroups = cgroups
        self.stream_restore_shared = stream_restore_shared
        self.binary = binary
        self.start_timeout = start_timeout
        self._version: str | None = None
        self._drop_flags: DropFlags | None = None

    @classmethod
    def for_host(cls) -> QemuVmm:
        """The server's VMM: every VM whose config asks for limits gets a cgroup."""
        return cls(cgroups=detect_cgroup_driver())

    async def version(self) -> str:
        if self._version is None:
            self._version = await asyncio.to_thread(qemu_version, self.binary)
        return self._version

    async def drop_flags(self) -> DropFlags:
        if self._drop_flags is None:
            flags: DropFlags = await asyncio.to_thread(qemu_drop_flags, self.binary)
            self._drop_flags = flags
            return flags
        return self._drop_flags

    # --- boot -------------------------------------------------------------------------------

    async def boot(self, cfg: VmConfig) -> QemuProcess:
        """Cold-boot ``cfg`` (its disk overlay must exist) with RAM in a fresh shared file."""
        if not cfg.disk.exists():
            raise VmmError(f"VM {cfg.vm_id}: disk {cfg.disk} does not exist (create_overlay)")
        memory = MemorySpec(cfg.memory_file, share=True)
        await asyncio.to_thread(_fresh_memory_file, cfg.memory_file, cfg.memory_mib)
        return await self._start(cfg, memory, incoming=False)

    # --- restore ----------------------------------------------------------------------------

    async def restore(
        self, cfg: VmConfig, snapshot_dir: Path, *, consume: bool = False
    ) -> QemuProcess:
        """Start a NEW QEMU from ``snapshot_dir`` and run it.

        ``consume=False`` (RunMicrovm; the snapshot stays intact and can be cloned again): RAM
        is the snapshot's memory file mapped copy-on-write (read-only file, ``share=off``) and
        the disk a new overlay over the snapshot's frozen disk. ``consume=True`` (resume of a
        suspend snapshot): the VM takes over the snapshot's RAM file and disk (hard links, no
        copy) and the snapshot directory is deleted once the VM runs.
        A missing, corrupt or incompatible snapshot raises ``SnapshotError``; nothing is left
        running on any failure. Every file is checked (size, mtime, the device state's sha256)
        before QEMU starts: a migration stream is a large parser to hand untrusted bytes to.
        """
        manifest = await asyncio.to_thread(snap.load_manifest, snapshot_dir)
        snap.check_compatible(
            manifest,
            memory_mib=cfg.memory_mib,
            vcpus=cfg.vcpus,
            accel=cfg.accel,
            qemu_version=await self.version(),
            where=snapshot_dir,
        )
        created: list[Path] = []
        try:
            memory = await asyncio.to_thread(
                _restore_files,
                cfg,
                snapshot_dir,
                manifest,
                consume,
                created,
                self.stream_restore_shared,
            )
        except OSError as exc:
            await asyncio.to_thread(snap.remove_quietly, *created)
            log.warning("VM %s: cannot prepare restore from %s: %s", cfg.vm_id, snapshot_dir, exc)
            why = exc.strerror or type(exc).__name__
            raise SnapshotError(f"cannot prepare the restore of VM {cfg.vm_id}: {why}") from exc
        except BaseException:
            await asyncio.to_thread(snap.remove_quietly, *created)
            raise

        # Hashed again while QEMU reads it (free): a file changed since the check is caught too.
        state_sha = manifest.files[snap.DEVICE_STATE].sha256

        async def load(qmp: Qmp) -> None:
            await set_migration_caps(qmp, ignore_shared=manifest.kind == "shared-memory")
            await migrate_from_file(
                qmp, snapshot_dir / snap.DEVICE_STATE, sha256=state_sha, timeout=MIGRATION_TIMEOUT
            )
            await qmp.cmd("cont")

        try:
            proc = await self._start(cfg, memory, incoming=True, after_start=load)
        except EmbervmError as exc:
            await asyncio.to_thread(snap.remove_quietly, *created)
            if isinstance(exc, VmmError):
                # A corrupt stream usually makes QEMU fail first: name the real cause.
                await asyncio.to_thread(snap.verify_file_hashes, snapshot_dir, manifest)
                raise SnapshotError(f"restore of VM {cfg.vm_id} failed: {exc}") from exc
            raise
        except BaseException:
            await asyncio.to_thread(snap.remove_quietly, *created)
            raise
        if consume:
            await asyncio.to_thread(shutil.rmtree, snapshot_dir, True)
        return proc

    # --- attach -----------------------------------------------------------------------------

    async def attach(self, cfg: VmConfig, pid: int) -> QemuProcess:
        """Take over a VMM started by an earlier server run (its pid and QMP socket)."""
        argv = await asyncio.to_thread(_procfs.process_cmdline, pid)
        if not argv or not any(str(cfg.qmp_socket) in a for a in argv):
            raise VmmError(f"pid {pid} is not the VMM of {cfg.vm_id} (or is gone)")
        qmp = await Qmp.connect(cfg.qmp_socket, timeout=self.start_timeout)
        share = not any("share=off" in a or "memory-backend-ram" in a for a in argv)
        mem_path: Path | None = None
        for a in argv:
            m = re.search(r"mem-path=([^,]+)", a)
            if m:
                mem_path = Path(m.group(1))
        cgroup = None
        if self.cgroups is not None and cfg.cgroup is not None:
            cgroup = self.cgroups.existing(_cgroup_name(cfg))
        return QemuProcess(
            cfg, pid, qmp,
            memory=MemorySpec(mem_path, share=share),
            qemu_version=await self.version(), child=None, cgroup=cgroup,
        )  # fmt: skip

    # --- spawning -----------------------------------------------------------------------------

    async def _start(
        self,
        cfg: VmConfig,
        memory: MemorySpec,
        *,
        incoming: bool,
        after_start: Callable[[Qmp], Awaitable[None]] | None = None,
    ) -> QemuProcess:
        for sock in (cfg.qmp_socket, cfg.agent_socket):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if not cfg.unprivileged:
            return await self._spawn(cfg, memory, None, incoming, after_start)
        flags = await self.drop_flags()
        # The chroot: QEMU, once dropped, must not even list the VM's directory.
        await asyncio.to_thread(os.chmod, cfg.workdir, 0o700)
        in_use = await asyncio.to_thread(uids_in_use)
        with claimed_uid(cfg.vm_id, in_use) as uid:
            drop = PrivilegeDrop(uid, cfg.workdir, flags)
            return await self._spawn(cfg, memory, drop, incoming, after_start)

    async def _spawn(
        self,
        cfg: VmConfig,
        memory: MemorySpec,
        drop: PrivilegeDrop | None,
        incoming: bool,
        after_start: Callable[[Qmp], Awaitable[None]] | None,
    ) -> QemuProcess:
        disk_fds = await asyncio.to_thread(disk_descriptors, cfg.disk)
        serial_r, serial_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        logs: list[PipeLog] = []
        stderr_path = cfg.workdir / STDERR_LOG
        try:
            logs.append(await PipeLog.open(serial_r, cfg.console_log))
            serial_r = -1
            logs.append(await PipeLog.open(stderr_r, stderr_path))
            stderr_r = -1
            argv = qemu_argv(
                cfg, memory=memory, incoming=incoming, binary=self.binary,
                serial_fd=serial_w, disk_fds=disk_fds, drop=drop,
            )  # fmt: skip
            if incoming:
                argv.append("-S")  # stay paused after loading: the VMM decides when to run
            if cfg.sandbox or drop is not None:
                mounts: tuple[rootview.Mount, ...] = ()
                if drop is not None:  # reads the disk's qcow2 headers: off the loop
                    mounts = await asyncio.to_thread(rootview.vmm_view, cfg, memory, self.binary)
                bpf = seccomp.program() if cfg.sandbox else None
                argv = [*launchstep.launch_prefix(seccomp_filter=bpf, mounts=mounts), *argv]
            if cfg.netns is not None:
                argv = ["ip", "netns", "exec", cfg.netns, *argv]
            cgroup = await asyncio.to_thread(self._make_cgroup, cfg)
            if cgroup is not None:
                argv = [*cgroup.launch_prefix(), *argv]
            try:
                child = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr_w,
                    pass_fds=(serial_w, *disk_fds),
                    start_new_session=True,
                )
            except OSError as exc:
                if cgroup is not None:
                    cgroup.destroy()
                raise VmmError(f"cannot start QEMU for {cfg.vm_id}: {exc}") from exc
        except BaseException:
            for pipe_log in logs:
                pipe_log.close()
            raise
        finally:
            for fd in (serial_r, serial_w, stderr_r, stderr_w, *disk_fds):
                if fd >= 0:
                    os.close(fd)
        exited = asyncio.ensure_future(child.wait())
        qmp: Qmp | None = None
        try:
            qmp = await Qmp.connect(cfg.qmp_socket, timeout=self.start_timeout, alive=exited)
            proc = QemuProcess(
                cfg, child.pid, qmp, memory=memory, qemu_version=await self.version(),
                child=child, cgroup=cgroup, logs=logs,
            )  # fmt: skip
        except BaseException as exc:
            await _reap(child, exited)
            if qmp is not None:
                await qmp.close()
            if cgroup is not None:
                with contextlib.suppress(JailError):
                    cgroup.destroy()
            await asyncio.gather(*(pipe_log.ended(LOG_DRAIN_TIMEOUT) for pipe_log in logs))
            if isinstance(exc, VmmError):
                raise _failure(cfg, "did not start", exc, stderr_path) from exc
            raise
        finally:
            exited.cancel()
        if after_start is not None:
            try:
                await after_start(qmp)
            except BaseException as exc:
                await proc.kill()
                if isinstance(exc, VmmError):
                    raise _failure(cfg, "failed while loading its state", exc, stderr_path) from exc
                raise
        return proc

    def _make_cgroup(self, cfg: VmConfig) -> Cgroup | None:
        if self.cgroups is None or cfg.cgroup is None:
            return None
        name = _cgroup_name(cfg)
        old = self.cgroups.existing(name)
        if old is not None:
            if old.pids():
                raise JailError(f"cgroup {name} is still in use by {sorted(old.pids())}")
            old.destroy()
        limits = cfg.effective_limits()
        return self.cgroups.create(name, limits, io_device=block_device_of(cfg.disk))


def _cgroup_name(cfg: VmConfig) -> str:
    return f"vm-{cfg.vm_id}"


async def _reap(child: asyncio.subprocess.Process, exited: asyncio.Future[Any]) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(exited), 10)


def _failure(cfg: VmConfig, what: str, exc: VmmError, stderr_path: Path) -> VmmError:
    """A short, fixed reason for callers (it reaches the API's ``stateReason``); QEMU's own
    words, with the host paths in them, go to the server log only."""
    log.warning("VM %s: the VMM %s: %s; %s", cfg.vm_id, what, exc, _tail(stderr_path))
    return VmmError(f"the VMM of {cfg.vm_id} {what} (details in the server log)")


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "no QEMU stderr"
    return f"QEMU stderr: {text[-n:]}" if text else "QEMU stderr empty"


def _fresh_memory_file(path: Path, memory_mib: int) -> None:
    """A new sparse RAM file, 0600 (unlinking any old one: a live VMM may still map its inode)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, memory_mib << 20)
    finally:
        os.close(fd)


def _restore_files(
    cfg: VmConfig,
    snapshot_dir: Path,
    manifest: snap.SnapshotManifest,
    consume: bool,
    created: list[Path],
    stream_shared: bool,
) -> MemorySpec:
    """Prepare RAM file and disk for a restore; record every file made in ``created``."""
    frozen_disk = snapshot_dir / snap.DISK
    snap.remove_quietly(cfg.disk)
    if consume:
        os.link(frozen_disk, cfg.disk)
    else:
        create_overlay(frozen_disk, cfg.disk, "qcow2")
    created.append(cfg.disk)
    if manifest.kind == "shared-memory":
        if not consume:
            return MemorySpec(snapshot_dir / snap.MEMORY, share=False)
        snap.remove_quietly(cfg.memory_file)
        os.link(snapshot_dir / snap.MEMORY, cfg.memory_file)
        created.append(cfg.memory_file)
        return MemorySpec(cfg.memory_file, share=True)
    if manifest.kind == "delta":
        # The guest's RAM is the base file mapped copy-on-write, plus the delta loaded on top.
        if not consume:
            return MemorySpec(snapshot_dir / snap.BASE_MEMORY, share=False)
        base = cfg.workdir / snap.BASE_MEMORY
        snap.remove_quietly(base)  # a live VMM may still map the old inode: unlink, not truncate
        os.link(snapshot_dir / snap.BASE_MEMORY, base)
        created.append(base)
        return MemorySpec(base, share=False)
    if not stream_shared:
        return MemorySpec(None, share=False)
    _fresh_memory_file(cfg.memory_file, manifest.memory_mib)
    created.append(cfg.memory_file)
    return MemorySpec(cfg.memory_file, share=True)


def _implements(vmm: QemuVmm, proc: QemuProcess) -> tuple[Vmm, VmProcess]:
    """Never called: mypy checks here that the QEMU classes satisfy the Protocols."""
    return vmm, proc

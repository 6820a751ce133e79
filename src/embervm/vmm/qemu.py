"""``QemuVmm``: boots, restores and re-attaches QEMU ``microvm`` processes.

Launch chain (each link ``exec``s the next, so the pid the caller sees is QEMU's):
``/bin/sh`` joining the VM's cgroup → ``ip netns exec <netns>`` (when the VM has a netns) →
``qemu-system-x86_64 ...`` with the seccomp sandbox. QEMU opens no files for migrations: the
VMM passes them as file descriptors over QMP (``getfd``), so ``spawn=deny`` holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from embervm.errors import EmbervmError, JailError, SnapshotError, VmmError
from embervm.vmm import _proc
from embervm.vmm import snapshot as snap
from embervm.vmm.api import Vmm, VmProcess
from embervm.vmm.cmdline import QEMU_BINARY, MemorySpec, qemu_argv
from embervm.vmm.config import VmConfig
from embervm.vmm.disks import create_overlay
from embervm.vmm.jail import Cgroup, CgroupDriver
from embervm.vmm.process import MIGRATION_TIMEOUT, QemuProcess
from embervm.vmm.qmp import Qmp, migrate_from_file, set_migration_caps

START_TIMEOUT = 15.0


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """``7.2.22`` from ``qemu-system-x86_64 --version``."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise VmmError(f"cannot run {binary} --version: {exc}") from exc
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not m:
        raise VmmError(f"cannot parse QEMU version from {out!r}")
    return m.group(1)


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

    async def version(self) -> str:
        if self._version is None:
            self._version = await asyncio.to_thread(qemu_version, self.binary)
        return self._version

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
            raise SnapshotError(f"cannot prepare restore from {snapshot_dir}: {exc}") from exc
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
                raise SnapshotError(f"restore from {snapshot_dir} failed: {exc}") from exc
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
        argv = await asyncio.to_thread(_proc.process_cmdline, pid)
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
        argv = qemu_argv(cfg, memory=memory, incoming=incoming, binary=self.binary)
        if incoming:
            argv.append("-S")  # stay paused after loading: the VMM decides when to run
        if cfg.netns is not None:
            argv = ["ip", "netns", "exec", cfg.netns, *argv]
        cgroup = await asyncio.to_thread(self._make_cgroup, cfg)
        if cgroup is not None:
            argv = [*cgroup.launch_prefix(), *argv]
        stderr_path = cfg.workdir / "qemu.stderr"
        try:
            with stderr_path.open("wb") as stderr:
                child = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    start_new_session=True,
                )
        except OSError as exc:
            if cgroup is not None:
                cgroup.destroy()
            raise VmmError(f"cannot start QEMU for {cfg.vm_id}: {exc}") from exc
        exited = asyncio.ensure_future(child.wait())
        qmp: Qmp | None = None
        try:
            qmp = await Qmp.connect(cfg.qmp_socket, timeout=self.start_timeout, alive=exited)
            proc = QemuProcess(
                cfg, child.pid, qmp, memory=memory, qemu_version=await self.version(),
                child=child, cgroup=cgroup,
            )  # fmt: skip
        except BaseException as exc:
            await _reap(child, exited)
            if qmp is not None:
                await qmp.close()
            if cgroup is not None:
                with contextlib.suppress(JailError):
                    cgroup.destroy()
            if isinstance(exc, VmmError):
                raise VmmError(f"{exc}; {_tail(stderr_path)}") from exc
            raise
        finally:
            exited.cancel()
        if after_start is not None:
            try:
                await after_start(qmp)
            except BaseException as exc:
                await proc.kill()
                if isinstance(exc, VmmError):
                    raise VmmError(f"{exc}; {_tail(stderr_path)}") from exc
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
        return self.cgroups.create(name, cfg.effective_limits())


def _cgroup_name(cfg: VmConfig) -> str:
    return f"vm-{cfg.vm_id}"


async def _reap(child: asyncio.subprocess.Process, exited: asyncio.Future[Any]) -> None:
    if child.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(exited), 10)


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "no QEMU stderr"
    return f"QEMU stderr: {text[-n:]}" if text else "QEMU stderr empty"


def _fresh_memory_file(path: Path, memory_mib: int) -> None:
    """A new sparse RAM file (unlinking any old one: a live VMM may still map its inode)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with path.open("wb") as f:
        f.truncate(memory_mib << 20)


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

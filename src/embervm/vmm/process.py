"""``QemuProcess``: one running QEMU, driven over QMP, watched until it exits.

Exit supervision: a watcher task awaits the process (our child: ``Process.wait``; an attached
VMM of a previous server run: its pidfd) and resolves ``wait_exit()`` with a ``VmExit`` that
says whether Embervm asked for the exit (``expected``) and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import SnapshotError, VmmError
from embervm.point_of_no_return import past_point_of_no_return
from embervm.vmm import _procfs
from embervm.vmm import snapshot as snap
from embervm.vmm.cmdline import MemorySpec
from embervm.vmm.config import VmConfig, VmStats
from embervm.vmm.disks import create_overlay, disk_descriptors
from embervm.vmm.jail import Cgroup
from embervm.vmm.logcap import PipeLog
from embervm.vmm.qmp import Qmp, migrate_to_file, set_migration_caps
from embervm.vmm.ramdelta import DeltaUnsupported

log = logging.getLogger("embervm.vmm")

MIGRATION_TIMEOUT = 120.0
#: How long an exited VMM's console and stderr pipes may take to deliver their last bytes.
LOG_DRAIN_TIMEOUT = 5.0
#: ``query-migrate`` states of a migration still in flight.
MIGRATING = ("setup", "active", "cancelling", "device", "pre-switchover")
_BANDWIDTH = 100 << 30  # the default ~32 MiB/s would make stream snapshots crawl


@dataclass(frozen=True)
class VmExit:
    """How a VMM process ended. ``returncode`` is -N for signal N, -1 when unknown (attached)."""

    returncode: int
    reason: str
    expected: bool  # True when Embervm stopped, killed or snapshotted it


class QemuProcess:
    """A QEMU microVM process (see ``embervm.vmm.api.VmProcess``)."""

    def __init__(
        self,
        cfg: VmConfig,
        pid: int,
        qmp: Qmp,
        *,
        memory: MemorySpec,
        qemu_version: str,
        child: asyncio.subprocess.Process | None,
        cgroup: Cgroup | None,
        logs: Sequence[PipeLog] = (),
    ) -> None:
        self.cfg = cfg
        self.pid = pid
        self.memory = memory
        self.qemu_version = qemu_version
        self._qmp = qmp
        self._child = child
        self._cgroup = cgroup
        self._logs = tuple(logs)
        self._expected: str | None = None
        self._exit: asyncio.Future[VmExit] = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.create_task(self._watch(), name=f"vmm-watch-{cfg.vm_id}")

    # --- supervision -----------------------------------------------------------------------

    async def _watch(self) -> None:
        if self._child is not None:
            code = await self._child.wait()
        else:
            await _procfs.wait_pidfd(self.pid)
            code = -1
        if self._expected is not None:
            reason, expected = self._expected, True
        elif code < 0 and code != -1:
            reason, expected = f"VMM killed by signal {-code}", False
        else:
            reason, expected = f"VMM exited unexpectedly (code {code})", False
        await self._qmp.close()
        if self._cgroup is not None:
            with contextlib.suppress(Exception):
                self._cgroup.destroy()
        await asyncio.gather(*(pipe_log.ended(LOG_DRAIN_TIMEOUT) for pipe_log in self._logs))
        if not self._exit.done():
            self._exit.set_result(VmExit(code, reason, expected))

    @property
    def returncode(self) -> int | None:
        return self._exit.result().returncode if self._exit.done() else None

    @property
    def exit_info(self) -> VmExit | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> int:
        return (await asyncio.shield(self._exit)).returncode

    async def wait_exit(self) -> VmExit:
        return await asyncio.shield(self._exit)

    async def detach(self) -> None:
        """Let go of the VMM without stopping it (server shutdown; ``Vmm.attach`` takes it back).

        QEMU serves one QMP client at a time, so the session is closed here. The exit future
        is left unresolved; this object must not be used afterwards.
        """
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        await self._qmp.close()
        for pipe_log in self._logs:
            pipe_log.close()  # QEMU's later console output finds no reader and is dropped

    def _ensure_alive(self) -> None:
        if self._exit.done():
            raise VmmError(f"VM {self.cfg.vm_id}: {self._exit.result().reason}")

    # --- control -----------------------------------------------------------------------------

    async def qmp(self, name: str, args: dict[str, object] | None = None) -> object:
        """Raw QMP escape hatch (tests, diagnostics)."""
        self._ensure_alive()
        return await self._qmp.cmd(name, args)

    async def status(self) -> str:
        self._ensure_alive()
        result = await self._qmp.cmd("query-status")
        return str(result["status"])

    async def cancel_migration(self) -> None:
        """Cancel a snapshot's migration that a dead server started (its reader is gone);
        returns once QEMU says none is in flight, or after ~5 s. Best effort."""
        with contextlib.suppress(VmmError):
            await self.qmp("migrate_cancel")
            for _ in range(100):
                status = await self.qmp("query-migrate")
                if not isinstance(status, dict) or status.get("status") not in MIGRATING:
                    return
                await asyncio.sleep(0.05)

    async def pause(self) -> None:
        self._ensure_alive()
        await self._qmp.cmd("stop")

    async def cont(self) -> None:
        self._ensure_alive()
        await self._qmp.cmd("cont")

    async def kill(self) -> None:
        """SIGKILL, then wait (bounded) for the exit to be observed."""
        if self._exit.done():
            return
        self._expected = self._expected or "killed by Embervm"
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            await asyncio.wait_for(asyncio.shield(self._exit), 10)
        except TimeoutError as exc:
            raise VmmError(f"VM {self.cfg.vm_id}: pid {self.pid} survived SIGKILL") from exc

    async def stop(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """QMP ``quit`` (QEMU flushes and exits), then SIGTERM, then SIGKILL; bounded."""
        if self._exit.done():
            return self._exit.result().returncode
        self._expected = self._expected or "stopped by Embervm"
        with contextlib.suppress(VmmError):
            await self._qmp.cmd("quit", timeout=max(timeout / 2, 0.1))
        for sig, wait in ((signal.SIGTERM, timeout / 2), (signal.SIGKILL, 10.0)):
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), wait)
                break
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
        await self.wait()
        return self._exit.result().returncode

    async def stats(self) -> VmStats:
        self._ensure_alive()
        return await asyncio.to_thread(_procfs.read_stats, self.pid)

    # --- snapshots ----------------------------------------------------------------------------

    async def snapshot(self, dest_dir: Path, *, resume: bool = False) -> snap.SnapshotManifest:
        """Write a snapshot of this VM to ``dest_dir`` atomically.

        ``resume=False`` (suspend, image snapshot): the VMM exits afterwards. The kind follows
        from how the VM's RAM is mapped:

        - its own shared file (booted, or resumed from ``shared-memory``): that file is handed
          over (hard link, no copy; kind ``shared-memory``, only device state and dirty pages
          are written);
        - a private copy-on-write mapping of a file (a clone of an image, or a VM resumed from
          a ``delta``): only the pages that differ from that file are streamed, and the file is
          linked as ``base.memory`` (kind ``delta``; a stream the filter cannot rewrite falls
          back to ``stream``);
        - anonymous memory: every non-zero page is streamed (kind ``stream``).

        ``resume=True``: the VM keeps running afterwards; its RAM is streamed (``delta`` or
        ``stream``) and the disk frozen by switching the VM onto a new qcow2 overlay.

        If anything fails or the call is cancelled before the snapshot is committed, the temp
        files are removed and a VM that was running runs again; an old snapshot at
        ``dest_dir`` is kept.
        """
        self._ensure_alive()
        shared = self.memory.share and self.memory.path is not None and not resume
        base = self.memory.path if not self.memory.share else None
        tmp = await asyncio.to_thread(snap.temp_dir_for, dest_dir)
        was_running = (await self._qmp.cmd("query-status"))["running"]
        committed = False
        try:
            await self._qmp.cmd("stop")
            await set_migration_caps(self._qmp, ignore_shared=shared)
            await self._qmp.cmd("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
            disk_src = self.cfg.disk
            if resume:
                disk_src = await self._switch_disk_overlay()
            # The delta is cut against the link, not the path: the very file a resume maps.
            linked: Path | None = None
            if base is not None and await asyncio.to_thread(_link_base, base, tmp):
                linked = tmp / snap.BASE_MEMORY
            state_file = tmp / snap.DEVICE_STATE
            try:
                state = await migrate_to_file(
                    self._qmp, state_file, timeout=MIGRATION_TIMEOUT, base=linked
                )
            except DeltaUnsupported as exc:
                log.warning("VM %s: full RAM stream instead of a delta: %s", self.cfg.vm_id, exc)
                await asyncio.to_thread(snap.remove_quietly, tmp / snap.BASE_MEMORY)
                linked = None
                state = await migrate_to_file(self._qmp, state_file, timeout=MIGRATION_TIMEOUT)
            manifest = await asyncio.to_thread(
                self._assemble, tmp, disk_src, state, shared=shared, delta=linked is not None
            )
            # From the commit on, the snapshot owns the disk (and a shared RAM file): the VM
            # must stop, and a cancel arriving now is too late to undo anything.
            manifest = await past_point_of_no_return(
                asyncio.to_thread(snap.commit_snapshot_dir, tmp, dest_dir, manifest)
            )
            committed = True
        except BaseException as exc:
            if not self._exit.done():
                await asyncio.shield(self._undo_snapshot(was_running))
            await asyncio.to_thread(snap.discard_temp_dir, tmp)
            if isinstance(exc, VmmError | OSError):
                raise SnapshotError(f"snapshot of VM {self.cfg.vm_id} failed: {exc}") from exc
            raise
        finally:
            if committed and not resume:
                # The snapshot now owns the RAM file and disk: this VM must never run again.
                self._expected = "snapshotted and stopped"
                await past_point_of_no_return(self.kill())
        if resume and was_running:
            await past_point_of_no_return(self._qmp.cmd("cont"))  # committed: it runs on
        return manifest

    async def _undo_snapshot(self, was_running: bool) -> None:
        """Cancel a migration still in flight and let a VM that was running run again."""
        with contextlib.suppress(VmmError):
            await self._qmp.cmd("migrate_cancel", timeout=5)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while loop.time() < deadline:
                status = (await self._qmp.cmd("query-migrate", timeout=5)).get("status")
                if status in (None, "cancelled", "failed", "completed"):
                    break
                await asyncio.sleep(0.01)
            if was_running:
                await self._qmp.cmd("cont", timeout=5)

    async def _switch_disk_overlay(self) -> Path:
        """Freeze the current disk: the VM moves onto a new overlay backed by it."""
        current = self.cfg.disk
        await self.switch_disk_overlay(
            current.with_name(f"{current.stem}.{int(time.time() * 1000)}.qcow2")
        )
        return current

    async def switch_disk_overlay(self, new: Path) -> None:
        """Move the VM's disk onto ``new``, a qcow2 overlay made here over the current disk,
        which is frozen from then on. The host creates ``new`` (0600, its backing file named
        by the host path) and hands QEMU a read-write and a read-only descriptor of it in an
        fd set (``/dev/fdset/N``): a jailed QEMU can neither create nor open a file itself,
        and the read-only one lets it reopen the file read-only once a later switch freezes
        it. File locking is off, as for the first disk (``cmdline``): the fd set keeps the
        read-write description open, and its lock would outlive the freeze and keep clones
        from using the frozen file as their backing file."""
        self._ensure_alive()
        await asyncio.to_thread(create_overlay, self.cfg.disk, new, "qcow2")
        try:
            fds = await asyncio.to_thread(disk_descriptors, new)
            try:
                fdset = await self._qmp.add_fd(fds[0])
                await self._qmp.add_fd(fds[1], fdset)
            finally:
                for fd in fds:
                    os.close(fd)
            node = f"disk-{fdset}"
            await self._qmp.cmd(
                "blockdev-add",
                {"driver": "qcow2", "node-name": node, "backing": None, "discard": "unmap",
                 "cache": {"no-flush": True, "direct": False},
                 "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}",
                          "locking": "off"}},
            )  # fmt: skip
            await self._qmp.cmd("blockdev-snapshot", {"node": "d0", "overlay": node})
        except BaseException:
            await asyncio.to_thread(snap.remove_quietly, new)
            raise
        self.cfg = self.cfg.with_changes(disk=new)

    def _assemble(
        self, tmp: Path, disk: Path, state: tuple[int, str], *, shared: bool, delta: bool
    ) -> snap.SnapshotManifest:
        """Link RAM file and disk into ``tmp`` (same filesystem, no copy) and describe them."""
        files: dict[str, snap.FileEntry] = {}
        files[snap.DEVICE_STATE] = snap.FileEntry(*state)
        if delta:
            files[snap.BASE_MEMORY] = snap.FileEntry((tmp / snap.BASE_MEMORY).stat().st_size)
        if shared and self.memory.path is not None:
            os.link(self.memory.path, tmp / snap.MEMORY)
            with open(tmp / snap.MEMORY, "rb+") as f:
                os.fdatasync(f.fileno())  # dirty guest pages reach the disk
            files[snap.MEMORY] = snap.FileEntry((tmp / snap.MEMORY).stat().st_size)
        os.link(disk, tmp / snap.DISK)
        files[snap.DISK] = snap.FileEntry((tmp / snap.DISK).stat().st_size)
        return snap.SnapshotManifest(
            kind="shared-memory" if shared else "delta" if delta else "stream",
            vm_id=self.cfg.vm_id,
            memory_mib=self.cfg.memory_mib,
            vcpus=self.cfg.vcpus,
            accel=self.cfg.accel,
            qemu_version=self.qemu_version,
            kernel_release=self.cfg.kernel_release,
            kernel=str(self.cfg.kernel),
            initrd=str(self.cfg.initrd),
            cmdline=self.cfg.cmdline,
            files=files,
        )


def _link_base(base: Path, tmp: Path) -> bool:
    """Hard-link the RAM file a delta is taken against into the snapshot (False: cannot)."""
    try:
        os.link(base, tmp / snap.BASE_MEMORY)
    except OSError as exc:  # another filesystem, or the file is gone: take a full stream
        log.warning("cannot link %s into %s (%s): full RAM stream", base, tmp, exc)
        return False
    return True

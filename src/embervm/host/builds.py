"""``LocalMachineProvider``: the build pipeline's VMs on this host (``embervm.imagebuild.machine``).

Disk layers are qcow2 files in ``layers/``; the managed base image's layer is the raw base
disk itself. A build VM boots on a fresh overlay in ``layers/`` over its parent layer;
``commit_layer`` syncs the guest and switches the VM onto a new overlay with QMP
``blockdev-snapshot-sync``, so the old overlay becomes an immutable layer that later builds
(and the step cache) reuse. App VMs boot the same way and end in a real memory snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
from pathlib import Path
from typing import Literal

from embervm.config import DataDir
from embervm.errors import GuestError, VmmError
from embervm.guest import GuestAgent
from embervm.host._boot import BootInputs, connect_agent, vm_dir_name
from embervm.host._leftovers import reclaim_vm_dirs
from embervm.host.build_agent import AgentOps
from embervm.imagebuild.cache import LayerRef
from embervm.imagebuild.machine import SnapshotSizes
from embervm.network import NetworkManager
from embervm.vmm import QemuVmm, VmConfig, Vmm, VmProcess, create_overlay
from embervm.vmm.snapshot import DISK, MEMORY

BASE_IMAGES = ("debian12",)
SYNC_TIMEOUT = 120.0


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class _Machine(AgentOps):
    """A VM of the build: agent operations plus layers, snapshot and shutdown."""

    def __init__(
        self,
        provider: LocalMachineProvider,
        *,
        vm_id: str,
        workdir: Path,
        process: VmProcess,
        client: GuestAgent,
        disk: Path,
    ) -> None:
        super().__init__(client)
        self._provider = provider
        self.vm_id = vm_id
        self.workdir = workdir
        self.process = process
        self.disk = disk
        self._done = False

    async def commit_layer(self) -> LayerRef:
        result = await self.client.exec(["sync"], timeout=SYNC_TIMEOUT)
        if result.exit_code != 0:
            raise GuestError(f"sync failed in the build VM (exit code {result.exit_code})")
        frozen = self.disk
        new = self._provider.new_layer_path()
        # The process's config follows: an app VM that took build steps is snapshotted later.
        await self.process.switch_disk_overlay(new)
        self.disk = new
        return LayerRef(str(frozen), await asyncio.to_thread(_allocated, frozen))

    async def snapshot(self, dest_dir: Path) -> SnapshotSizes:
        with contextlib.suppress(GuestError, OSError):
            await self.client.quiesce(auto_thaw=30.0)
        await self.close()
        await self.client.close()
        manifest = await self.process.snapshot(dest_dir)
        memory = manifest.files.get(MEMORY)
        disk = dest_dir / DISK
        return SnapshotSizes(
            memory_bytes=await asyncio.to_thread(_allocated, dest_dir / MEMORY)
            if memory is not None
            else 0,
            disk_bytes=await asyncio.to_thread(_allocated, disk) if disk.exists() else 0,
        )

    async def shutdown(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(Exception):
            await self.close()
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.process.returncode is None:
            await self.process.kill()
        await self._provider.release(self.vm_id, self.workdir, self.disk)


class LocalMachineProvider:
    """Implements ``embervm.imagebuild.machine.MachineProvider`` with real microVMs."""

    def __init__(
        self,
        root: Path,
        *,
        boot: BootInputs,
        network: NetworkManager,
        vmm: Vmm | None = None,
    ) -> None:
        self._root = root
        self._layers = DataDir(root).layers
        self._vms = root / "build-vms"
        self._boot = boot
        self._network = network
        self._vmm: Vmm = vmm or QemuVmm.for_host()

    async def reclaim_leftovers(self) -> list[str]:
        """At start-up, before any build: kill the build VMs of a dead run (their QEMU
        processes outlive it) and remove their directories."""
        return await reclaim_vm_dirs(self._vms, set())

    def new_layer_path(self) -> Path:
        self._layers.mkdir(parents=True, exist_ok=True)
        return self._layers / f"{secrets.token_hex(12)}.qcow2"

    async def base_layer(self, image: str) -> LayerRef:
        if image not in BASE_IMAGES:
            raise VmmError(f"unknown managed base image {image!r}")
        return LayerRef(str(self._boot.artifacts.base_disk), 0)

    async def has_layer(self, layer: LayerRef) -> bool:
        return await asyncio.to_thread(Path(layer.id).is_file)

    async def _start(self, layer: LayerRef, *, egress: bool, memory_mib: int) -> _Machine:
        vm_id = f"build-{secrets.token_hex(6)}"
        workdir = self._vms / vm_dir_name(vm_id)
        disk = self.new_layer_path()
        backing = Path(layer.id)
        backing_format: Literal["raw", "qcow2"] = (
            "raw" if backing == self._boot.artifacts.base_disk else "qcow2"
        )
        async with contextlib.AsyncExitStack() as undo:
            await asyncio.to_thread(workdir.mkdir, parents=True)
            undo.callback(shutil.rmtree, workdir, True)
            await asyncio.to_thread(create_overlay, backing, disk, backing_format)
            undo.callback(disk.unlink, missing_ok=True)
            net = await self._network.create(vm_id, egress=egress)
            undo.push_async_callback(self._network.destroy, vm_id)
            cfg: VmConfig = self._boot.config(
                vm_id, workdir, memory_mib=memory_mib, network=net
            ).with_changes(disk=disk)
            process = await self._vmm.boot(cfg)
            undo.push_async_callback(process.kill)
            client = await connect_agent(cfg, restored=False)
            undo.pop_all()
        return _Machine(
            self, vm_id=vm_id, workdir=workdir, process=process, client=client, disk=disk
        )

    async def start_build_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> _Machine:
        return await self._start(layer, egress=egress, memory_mib=memory_mib)

    async def start_app_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> _Machine:
        return await self._start(layer, egress=egress, memory_mib=memory_mib)

    async def restore_app_machine(self, snapshot_dir: Path, *, egress: bool) -> _Machine:
        """A clone of a fresh image snapshot, for the ``/validate`` hook."""
        from embervm.vmm import load_manifest

        manifest = await asyncio.to_thread(load_manifest, snapshot_dir)
        vm_id = f"validate-{secrets.token_hex(6)}"
        workdir = self._vms / vm_dir_name(vm_id)
        async with contextlib.AsyncExitStack() as undo:
            await asyncio.to_thread(workdir.mkdir, parents=True)
            undo.callback(shutil.rmtree, workdir, True)
            net = await self._network.create(vm_id, egress=egress)
            undo.push_async_callback(self._network.destroy, vm_id)
            cfg = self._boot.config(vm_id, workdir, memory_mib=manifest.memory_mib, network=net)
            process = await self._vmm.restore(cfg, snapshot_dir)
            undo.push_async_callback(process.kill)
            client = await connect_agent(cfg, restored=True)
            undo.pop_all()
        return _Machine(
            self, vm_id=vm_id, workdir=workdir, process=process, client=client, disk=cfg.disk
        )

    async def release(self, vm_id: str, workdir: Path, disk: Path) -> None:
        """Free a machine's network, directory and its unfrozen top overlay."""
        with contextlib.suppress(Exception):
            await self._network.destroy(vm_id)
        await asyncio.to_thread(shutil.rmtree, workdir, True)
        if disk.parent == self._layers:
            await asyncio.to_thread(disk.unlink, True)

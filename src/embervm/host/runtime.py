"""``LocalHost``: microVMs on this machine, launched from snapshots, suspended to disk.

One ``_Vm`` per live VM holds its VMM process, its agent connection, its network and a LIFO
cleanup stack of everything its start acquired. A watcher task notices a VMM that exits when
nobody asked it to, releases the VM's resources and reports the reason to ``on_exit`` (core
marks the VM TERMINATED with that ``stateReason``).

Suspend = quiesce the guest's disk, snapshot memory + device state + disk into the VM's
``suspend/`` directory (atomic; the VMM exits), keep the network (so the VM keeps its address).
Resume = restore that snapshot into a new VMM (``consume=True``: the snapshot is removed once
the VM runs), reconnect the agent, which sets the clock and reseeds the RNG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from embervm.errors import GuestError, NotFoundError, RuntimeFailure, VmmError
from embervm.fileio import atomic_write
from embervm.guest import GuestAgent
from embervm.guest.client import AppSpec, LogLine, PtySession
from embervm.host._boot import BootInputs, connect_agent, vm_dir_name
from embervm.host._leftovers import kill_vmms, reclaim_vm_dirs, vmm_pids
from embervm.network import NetworkManager, VmNetwork
from embervm.point_of_no_return import past_point_of_no_return
from embervm.vmm import QemuVmm, Vmm, VmProcess, load_manifest
from embervm.vmm.snapshot import BASE_MEMORY, MEMORY, SnapshotManifest, recover_snapshot_dir

log = logging.getLogger(__name__)

VmExitHandler = Callable[[str, str], Awaitable[None]]
"""Called as ``on_exit(vm_id, reason)`` when a VMM exits unexpectedly."""

SUSPEND_DIR = "suspend"
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class LaunchSpec:
    """What to run: a VM from an image snapshot, with or without internet egress."""

    vm_id: str
    snapshot_dir: Path
    egress: bool = False


@dataclass
class _Vm:
    vm_id: str
    workdir: Path
    network: VmNetwork
    process: VmProcess | None = None
    agent: GuestAgent | None = None
    watcher: asyncio.Task[None] | None = None
    expected_exit: bool = False
    rebuild_network: bool = False  # adopted after a restart: namespace and rules made anew
    memory_mib: int = 0  # the guest's RAM while a VMM runs it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class LocalHost:
    """Launch, suspend, resume and terminate microVMs on this machine (see module doc)."""

    def __init__(
        self,
        vms_dir: Path,
        *,
        boot: BootInputs,
        network: NetworkManager,
        vmm: Vmm | None = None,
        on_exit: VmExitHandler | None = None,
    ) -> None:
        self._vms_dir = vms_dir
        self._boot = boot
        self._network = network
        self._vmm: Vmm = vmm or QemuVmm.for_host()
        self._on_exit = on_exit
        self._vms: dict[str, _Vm] = {}

    # -- queries -------------------------------------------------------------------------

    def address(self, vm_id: str) -> str | None:
        """Where the proxy connects to reach the guest's ports (same for every port)."""
        vm = self._vms.get(vm_id)
        return vm.network.vm_address if vm else None

    def is_running(self, vm_id: str) -> bool:
        vm = self._vms.get(vm_id)
        return bool(vm and vm.process and vm.process.returncode is None)

    def memory_in_use_mib(self) -> int:
        """The guest RAM of the VMs whose VMM runs here (a fleet host reports it)."""
        return sum(vm.memory_mib for vm in self._vms.values() if self.is_running(vm.vm_id))

    def is_suspended(self, vm_id: str) -> bool:
        """Held with its suspend snapshot and no VMM (suspended, or adopted after a restart)."""
        vm = self._vms.get(vm_id)
        return bool(vm and vm.process is None)

    def _get(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            raise NotFoundError(f"MicroVM {vm_id} is not on this host")
        return vm

    # -- lifecycle -----------------------------------------------------------------------

    async def launch(self, spec: LaunchSpec) -> str:
        """Restore a new VM from an image snapshot; returns its address. Nothing is left
        behind if any step fails."""
        if spec.vm_id in self._vms:
            raise VmmError(f"MicroVM {spec.vm_id} already runs on this host")
        manifest = await asyncio.to_thread(load_manifest, spec.snapshot_dir)
        workdir = self._vms_dir / vm_dir_name(spec.vm_id)
        async with contextlib.AsyncExitStack() as undo:
            # 0700: the VM's RAM, disk and snapshots are nobody else's (B1).
            await asyncio.to_thread(workdir.mkdir, 0o700, parents=True, exist_ok=False)
            undo.callback(shutil.rmtree, workdir, ignore_errors=True)
            net = await self._network.create(spec.vm_id, egress=spec.egress)
            undo.push_async_callback(self._network.destroy, spec.vm_id)
            vm = _Vm(spec.vm_id, workdir, net, memory_mib=manifest.memory_mib)
            cfg = self._boot.config(
                spec.vm_id, workdir, memory_mib=manifest.memory_mib, network=net
            )
            vm.process = await self._vmm.restore(cfg, spec.snapshot_dir)
            undo.push_async_callback(vm.process.kill)
            vm.agent = await connect_agent(cfg, restored=True)
            await asyncio.to_thread(_record_process, workdir, vm.process.pid, manifest.memory_mib)
            undo.pop_all()
        self._vms[spec.vm_id] = vm
        self._watch(vm)
        return net.vm_address

    async def suspend(self, vm_id: str) -> int:
        """Snapshot the VM to its ``suspend/`` directory and stop its VMM; returns the bytes
        written (a RAM file handed over by hard link is not rewritten, so it does not count).
        Cancelled before the snapshot commits, the VM runs on."""
        vm = self._get(vm_id)
        async with vm.lock:
            if vm.process is None or vm.process.returncode is not None:
                raise VmmError(f"MicroVM {vm_id} is not running")
            vm.expected_exit = True
            try:  # a cancel during the freeze must thaw too, not leave it to auto_thaw
                if vm.agent is not None:
                    with contextlib.suppress(GuestError, OSError):
                        await vm.agent.quiesce(auto_thaw=30.0)
                manifest = await vm.process.snapshot(vm.workdir / SUSPEND_DIR)
            except BaseException:
                vm.expected_exit = False
                if vm.agent is not None:
                    with contextlib.suppress(Exception):
                        await vm.agent.thaw()
                raise
            await past_point_of_no_return(self._drop_process(vm))  # the snapshot is committed
            return written_bytes(manifest)

    async def resume(self, vm_id: str) -> None:
        """Restore the VM from its own suspend snapshot."""
        vm = self._get(vm_id)
        async with vm.lock:
            if vm.process is not None and vm.process.returncode is None:
                raise VmmError(f"MicroVM {vm_id} is already running")
            snapshot = vm.workdir / SUSPEND_DIR
            # Sizes and stamps only: the restore hashes the state file before QEMU starts, and
            # hashing it here too would read it twice.
            manifest = await asyncio.to_thread(load_manifest, snapshot, verify_hashes=False)
            if vm.rebuild_network:
                vm.network = await self._network.create(vm_id, egress=vm.network.egress)
                vm.rebuild_network = False
            cfg = self._boot.config(
                vm_id, vm.workdir, memory_mib=manifest.memory_mib, network=vm.network
            )
            vm.expected_exit = False
            vm.memory_mib = manifest.memory_mib
            vm.process = await self._vmm.restore(cfg, snapshot, consume=True)
            try:
                vm.agent = await connect_agent(cfg, restored=True)
            except BaseException:
                vm.expected_exit = True
                await vm.process.kill()
                raise
            await asyncio.to_thread(
                _record_process, vm.workdir, vm.process.pid, manifest.memory_mib
            )
            self._watch(vm)

    async def terminate(self, vm_id: str) -> None:
        """Stop the VM and release everything it holds. Idempotent."""
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            return
        async with vm.lock:
            vm.expected_exit = True
            await self._drop_process(vm, stop=True)
            await self._release(vm)

    async def shutdown(self) -> None:
        """Terminate every running VM; suspended VMs stay on disk for ``adopt_suspended``."""
        running = [v for v in list(self._vms) if self.is_running(v)]
        await asyncio.gather(*(self.terminate(v) for v in running))
        self._vms.clear()

    async def detach_all(self) -> list[str]:
        """Server shutdown: let go of every running VMM without stopping it (``reattach``
        takes them back after the restart); suspended VMs stay on disk. Returns the ids."""
        detached: list[str] = []
        for vm in list(self._vms.values()):
            if vm.process is not None and vm.process.returncode is None:
                vm.expected_exit = True
                if vm.watcher is not None:
                    vm.watcher.cancel()
                if vm.agent is not None:
                    with contextlib.suppress(Exception):
                        await vm.agent.close()
                await vm.process.detach()
                detached.append(vm.vm_id)
        self._vms.clear()
        return detached

    async def reattach(self, vm_ids: Iterable[str]) -> list[str]:
        """After a restart: take back the VMMs an earlier run left running (pid + QMP socket,
        agent reconnected, network as allocated); returns the ids that are running again.
        A VM that cannot be taken back is left to ``reclaim_leftovers``."""
        return [vm_id for vm_id in vm_ids if await self._take_back_running(vm_id)]

    async def _take_back_running(self, vm_id: str) -> bool:
        workdir = self._vms_dir / vm_dir_name(vm_id)
        record = await asyncio.to_thread(_read_process, workdir)
        net = self._network.lookup(vm_id)
        if vm_id in self._vms or record is None or net is None:
            return False
        recorded_pid, memory_mib = record
        # A resume the crash cut short runs a VMM whose pid no record names yet.
        live = await asyncio.to_thread(vmm_pids, workdir)
        pid = recorded_pid if recorded_pid in live or len(live) != 1 else live[0]
        cfg = self._boot.config(vm_id, workdir, memory_mib=memory_mib, network=net)
        try:
            process = await self._vmm.attach(cfg, pid)
        except RuntimeFailure as exc:
            log.warning("MicroVM %s: cannot re-attach: %s", vm_id, exc)
            return False
        vm = _Vm(vm_id, workdir, net, process=process, memory_mib=memory_mib)
        try:
            # A suspend the crash cut short left the guest stopped mid-snapshot: it runs on.
            interrupted = await process.status() != "running"
            if interrupted:
                await process.cancel_migration()
                await process.cont()
            vm.agent = await connect_agent(cfg, restored=False)
            if interrupted:
                await vm.agent.thaw()
        except RuntimeFailure as exc:
            log.warning("MicroVM %s: agent did not answer after re-attach: %s", vm_id, exc)
            await process.kill()
            return False
        await asyncio.to_thread(recover_snapshot_dir, workdir / SUSPEND_DIR)
        await asyncio.to_thread(_record_process, workdir, process.pid, memory_mib)
        self._vms[vm_id] = vm
        self._watch(vm)
        return True

    async def adopt_suspended(self, vm_ids: Iterable[str]) -> list[str]:
        """After a restart: take back the VMs that were suspended or being suspended or
        resumed; returns the ids held again. A committed suspend snapshot wins: any VMM of the
        VM is killed (a resume cut short must not leave a second copy running) and the VM is
        held suspended. Without one, a VMM that still runs (a suspend cut short, or a resume
        that had consumed its snapshot) is taken back running."""
        adopted: list[str] = []
        for vm_id in vm_ids:
            workdir = self._vms_dir / vm_dir_name(vm_id)
            if vm_id in self._vms:
                continue
            try:
                await asyncio.to_thread(recover_snapshot_dir, workdir / SUSPEND_DIR)
                await asyncio.to_thread(load_manifest, workdir / SUSPEND_DIR)
            except RuntimeFailure as exc:
                if await self._take_back_running(vm_id):
                    adopted.append(vm_id)
                else:
                    log.warning("MicroVM %s: suspend snapshot unusable: %s", vm_id, exc)
                continue
            await asyncio.to_thread(kill_vmms, workdir)
            net = self._network.lookup(vm_id)
            if net is None:
                net = await self._network.create(vm_id, egress=False)
            self._vms[vm_id] = _Vm(vm_id, workdir, net, rebuild_network=True)
            adopted.append(vm_id)
        return adopted

    # -- inside the guest ----------------------------------------------------------------

    async def start_app(self, vm_id: str, spec: AppSpec) -> None:
        agent = self._agent(vm_id)
        await agent.start_app(spec)

    async def open_shell(self, vm_id: str, *, cols: int, rows: int) -> PtySession:
        """A login shell on a PTY inside the VM."""
        return await self._agent(vm_id).open_pty(None, cols=cols, rows=rows)

    async def app_logs(self, vm_id: str) -> AsyncIterator[LogLine]:
        async for line in self._agent(vm_id).app_logs():
            yield line

    def agent(self, vm_id: str) -> GuestAgent:
        return self._agent(vm_id)

    def _agent(self, vm_id: str) -> GuestAgent:
        vm = self._get(vm_id)
        if vm.agent is None or vm.agent.closed:
            raise GuestError(f"MicroVM {vm_id} has no agent connection (is it suspended?)")
        return vm.agent

    # -- internals -----------------------------------------------------------------------

    def _watch(self, vm: _Vm) -> None:
        process = vm.process
        assert process is not None

        async def watch() -> None:
            exit_info = await process.wait_exit()
            if vm.expected_exit or vm.process is not process:
                return
            reason = f"the VMM exited unexpectedly: {exit_info.reason}"
            log.warning("MicroVM %s: %s", vm.vm_id, reason)
            if self._vms.get(vm.vm_id) is vm:
                self._vms.pop(vm.vm_id, None)
                await self._drop_process(vm)
                await self._release(vm)
            if self._on_exit is not None:
                await self._on_exit(vm.vm_id, reason)

        vm.watcher = asyncio.create_task(watch(), name=f"watch-{vm.vm_id}")

    async def _drop_process(self, vm: _Vm, *, stop: bool = False) -> None:
        if vm.agent is not None:
            with contextlib.suppress(Exception):
                await vm.agent.close()
            vm.agent = None
        process, vm.process = vm.process, None
        if process is not None and process.returncode is None and stop:
            try:
                await process.stop(timeout=STOP_TIMEOUT)
            except RuntimeFailure:
                await process.kill()

    async def _release(self, vm: _Vm) -> None:
        with contextlib.suppress(Exception):
            await self._network.destroy(vm.vm_id)
        await asyncio.to_thread(shutil.rmtree, vm.workdir, True)

    async def reclaim_leftovers(self) -> list[str]:
        """At start-up: kill QEMU processes and remove VM directories of dead runs."""
        return await reclaim_vm_dirs(self._vms_dir, {vm_dir_name(v) for v in self._vms})


PROCESS_FILE = "process.json"


def _record_process(workdir: Path, pid: int, memory_mib: int) -> None:
    """What ``reattach`` needs after a server restart (atomic and durable, 0600)."""
    atomic_write(workdir / PROCESS_FILE, json.dumps({"pid": pid, "memory_mib": memory_mib}))


def _read_process(workdir: Path) -> tuple[int, int] | None:
    try:
        body = json.loads((workdir / PROCESS_FILE).read_text())
        return int(body["pid"]), int(body["memory_mib"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def written_bytes(manifest: SnapshotManifest) -> int:
    """Bytes a snapshot wrote: all its files but a RAM file that was handed over or linked."""
    return sum(
        entry.size
        for name, entry in manifest.files.items()
        if not (manifest.kind == "shared-memory" and name == MEMORY) and name != BASE_MEMORY
    )

"""``LocalHostBackend``: core's ``HostBackend`` seam over ``embervm.host.LocalHost``.

It adds what the runtime does not know about: the image's runtime hooks (``hooks``), the app
log files (``applogs``) and cancellable suspends. A VM's hooks are saved next to its logs at
launch, so a resume after a server restart still calls them.

Size: a VM's memory is its image version's, which the snapshot fixes (a restore cannot change
guest RAM), and LocalHost gives the VMM the snapshot's memory, one vCPU per 2 GiB and a cgroup
CPU quota of memory / 2 GiB (at least a quarter core, ``embervm.sizing``), so ``VmSpec`` carries
no size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TypeVar

from embervm.contracts import SuspendOutcome, VmSpec
from embervm.errors import GuestError, RuntimeFailure
from embervm.host.applogs import AppLogFiles
from embervm.host.hooks import RuntimeHooks, call_hook
from embervm.host.runtime import LaunchSpec, LocalHost

log = logging.getLogger("embervm.host.backend")

T = TypeVar("T")


class LocalHostBackend:
    def __init__(self, host: LocalHost, logs: AppLogFiles) -> None:
        self.host = host
        self.logs = logs
        self._hooks: dict[str, RuntimeHooks] = {}

    def _hooks_file(self, microvm_id: str) -> Path:
        return self.logs.root / f"{microvm_id}.hooks.json"

    def _forget_hooks(self, microvm_id: str) -> None:
        self._hooks.pop(microvm_id, None)
        with contextlib.suppress(OSError, ValueError):
            self._hooks_file(microvm_id).unlink(missing_ok=True)

    def _hooks_of(self, microvm_id: str) -> RuntimeHooks:
        hooks = self._hooks.get(microvm_id)
        if hooks is None:
            hooks = RuntimeHooks.load(self._hooks_file(microvm_id))
            self._hooks[microvm_id] = hooks
        return hooks

    async def _hook(self, microvm_id: str, hook: str, body: bytes = b"") -> None:
        await call_hook(self.host.agent(microvm_id), self._hooks_of(microvm_id), hook, body)

    def _pump_logs(self, microvm_id: str) -> None:
        self.logs.pump(microvm_id, lambda: self.host.app_logs(microvm_id))

    async def recover(self, running: list[str], suspended: list[str]) -> list[str]:
        """After a restart: re-attach the VMs left running, take back the suspended ones;
        returns every id the host holds again (the rest is reclaimed as leftovers)."""
        attached = await self.host.reattach(running)
        for vm_id in attached:
            self._pump_logs(vm_id)
        return attached + await self.host.adopt_suspended(suspended)

    # -- HostBackend ---------------------------------------------------------------------

    async def launch(self, vm: VmSpec) -> None:
        hooks = RuntimeHooks.from_model(vm.hooks)
        self._hooks[vm.microvm_id] = hooks
        try:
            await asyncio.to_thread(self.logs.root.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(hooks.save, self._hooks_file(vm.microvm_id))
            await self.host.launch(LaunchSpec(vm.microvm_id, vm.snapshot_dir, vm.egress))
        except BaseException:
            self._forget_hooks(vm.microvm_id)
            raise
        self._pump_logs(vm.microvm_id)
        try:
            await self._hook(vm.microvm_id, "run", (vm.run_hook_payload or "").encode())
        except GuestError as exc:
            await self.terminate(vm.microvm_id, call_hooks=False)
            raise RuntimeFailure(f"the run hook failed: {exc}") from exc

    async def resume(self, microvm_id: str) -> None:
        await self.host.resume(microvm_id)
        self._pump_logs(microvm_id)
        try:
            await self._hook(microvm_id, "resume")
        except GuestError as exc:
            await self.terminate(microvm_id, call_hooks=False)
            raise RuntimeFailure(f"the resume hook failed: {exc}") from exc

    async def suspend(self, microvm_id: str, *, cancel: asyncio.Event) -> SuspendOutcome:
        """The /suspend hook, then the snapshot. ``cancel`` interrupts either: a hook still
        waiting is abandoned, a snapshot not yet committed is undone and the VM runs on."""
        if cancel.is_set():
            return SuspendOutcome(completed=False)
        hook = asyncio.create_task(self._suspend_hook(microvm_id))
        if not await _unless_cancelled(hook, cancel):
            return SuspendOutcome(completed=False)
        snapshot = asyncio.create_task(self.host.suspend(microvm_id))
        if not await _unless_cancelled(snapshot, cancel):
            return SuspendOutcome(completed=False)
        await self.logs.drain(microvm_id)
        return SuspendOutcome(completed=True, snapshot_bytes=snapshot.result())

    async def _suspend_hook(self, microvm_id: str) -> None:
        try:
            await self._hook(microvm_id, "suspend")
        except GuestError as exc:
            log.warning("MicroVM %s: %s; suspending anyway", microvm_id, exc)

    async def terminate(self, microvm_id: str, *, call_hooks: bool = True) -> None:
        if call_hooks and self.host.is_running(microvm_id):
            try:
                await self._hook(microvm_id, "terminate")
            except GuestError as exc:
                log.info("MicroVM %s: %s; terminating anyway", microvm_id, exc)
        await self.host.terminate(microvm_id)
        await self.logs.drain(microvm_id)
        self.logs.end(microvm_id)
        self._forget_hooks(microvm_id)

    def address(self, microvm_id: str) -> str | None:
        return self.host.address(microvm_id)

    def is_running(self, microvm_id: str) -> bool:
        return self.host.is_running(microvm_id)

    def is_suspended(self, microvm_id: str) -> bool:
        return self.host.is_suspended(microvm_id)


async def _unless_cancelled(task: asyncio.Task[T], cancel: asyncio.Event) -> bool:
    """Wait for ``task`` unless ``cancel`` is set first, then cancel it. True when the task
    finished (it may have got past its point of no return before the cancel reached it);
    its exception, if any, is raised. The task never outlives this call."""
    waiter = asyncio.create_task(cancel.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task})  # the undo runs to its end; our own cancel still raises
        if task.cancelled():
            return False
    task.result()
    return True

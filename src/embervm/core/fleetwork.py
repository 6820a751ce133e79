"""The fleet half of the ``Supervisor`` (docs/FLEET.md): a host takes the work the store placed
on it (``adopt``, ``keep_adopting``: woken by ``NOTIFY``, and on a short poll), follows a new
epoch (``set_fence``), and an API process wakes the host it wrote work for (``_wake``).

A mixin: ``Supervisor`` inherits it, and ``Supervised`` names what these methods use of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from embervm.contracts import MicrovmState, VmSpec
from embervm.core.builds import BuildRunner
from embervm.core.clock import to_datetime
from embervm.core.ids import state_reason
from embervm.core.vmspec import vm_spec
from embervm.store import HostFence, HostRegistry, MicrovmRecord, Repository, Transition

log = logging.getLogger("embervm.core")

ADOPT_POLL_SECONDS = 1.0  # a fleet host looks for work this often without a wake-up
ANY_HOST = "*"  # the wake-up of work any host may take (a build)


class Supervised(Protocol):
    repo: Repository
    host_id: str
    fence: HostFence | None
    runs_vms: bool
    hosts: HostRegistry | None
    builds: BuildRunner
    _flights: dict[str, asyncio.Task[None]]
    _stopping: set[str]
    _control_locks: dict[str, asyncio.Lock]

    def _lock(self, table: dict[str, asyncio.Lock], vm_id: str) -> asyncio.Lock: ...
    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]: ...
    def _now(self) -> float: ...
    async def move(
        self, vm_id: str, expect: Iterable[MicrovmState], state: MicrovmState, **values: Any
    ) -> Transition: ...
    def start_launch(self, vm: MicrovmRecord, spec_factory: Callable[[], VmSpec]) -> None: ...
    def _start_terminate(self, vm_id: str) -> None: ...
    def _start_suspend(self, vm_id: str) -> None: ...
    def _start_resume(self, vm_id: str) -> None: ...
    async def adopt(self) -> int: ...
    async def _adopt_one(self, vm: MicrovmRecord) -> bool: ...
    async def _wake_host_of(self, vm_id: str) -> None: ...


class FleetWork:
    fence: HostFence | None  # the Supervisor's; ``set_fence`` replaces it

    async def adopt(self: Supervised) -> int:
        """Start the work the store placed on this host (at this epoch) that no task here runs
        yet: a launch or a resume (PENDING), a suspend, a terminate. Returns how many started.
        A fleet host calls it when woken and on a short poll, so a lost wake-up only delays."""
        started = await self.builds.adopt() if self.runs_vms else 0
        placed = await self.repo.microvms_in_states(
            ("PENDING", "SUSPENDING", "TERMINATING"), host_id=self.host_id
        )
        for vm in placed:
            if self.fence is not None and vm.host_epoch != self.fence.epoch:
                continue
            async with self._lock(self._control_locks, vm.microvm_id):
                if await self._adopt_one(vm):
                    started += 1
        return started

    async def _adopt_one(self: Supervised, vm: MicrovmRecord) -> bool:
        vm_id = vm.microvm_id
        if vm_id in self._flights or vm_id in self._stopping:
            return False
        if vm.state == "TERMINATING":
            self._start_terminate(vm_id)
        elif vm.state == "SUSPENDING":
            self._start_suspend(vm_id)
        elif vm.suspended_at is not None:
            self._start_resume(vm_id)
        else:
            version = await self.repo.get_version(
                vm.account_id, vm.image_name, int(vm.image_version)
            )
            if version is None or not version.snapshot_dir:
                await self.move(
                    vm_id,
                    ["PENDING"],
                    "TERMINATED",
                    state_reason=state_reason("LaunchFailed", "the image version is gone"),
                    terminated_at=to_datetime(self._now()),
                )
                return False
            self.start_launch(vm, lambda: vm_spec(vm, version))
        return True

    def set_fence(self: Supervised, fence: HostFence) -> None:
        """A fleet host registered again (a new epoch): its writes from now on carry it."""
        if fence.host_id != self.host_id:
            raise ValueError("a host's fence names its own host")
        self.fence = fence
        self.builds.fence = fence

    def _wake(self: Supervised, vm_id: str) -> None:
        """An API process wrote work: wake the VM's host (best effort; it also polls)."""
        if self.hosts is not None:
            self.spawn(self._wake_host_of(vm_id), f"wake the host of {vm_id}")

    def _wake_hosts(self: Supervised, host_id: str) -> None:
        if self.hosts is not None:
            self.spawn(self.hosts.wake_host(host_id), f"wake {host_id}")

    async def _wake_host_of(self: Supervised, vm_id: str) -> None:
        vm = await self.repo.get_microvm(vm_id)
        if vm is not None and self.hosts is not None:
            await self.hosts.wake_host(vm.host_id)

    async def keep_adopting(self: Supervised, poll_seconds: float = ADOPT_POLL_SECONDS) -> None:
        """A fleet host: ``adopt`` whenever woken (``NOTIFY``) and every ``poll_seconds``."""
        woken = asyncio.Event()
        listening: contextlib.AbstractAsyncContextManager[None] = (
            self.hosts.listening_for_work(self.host_id, woken.set)
            if self.hosts is not None
            else contextlib.nullcontext()
        )
        async with listening:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll_seconds):
                        await woken.wait()
                woken.clear()
                try:
                    await self.adopt()
                except Exception:
                    log.exception("adopting work failed (retrying)")

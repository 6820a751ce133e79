"""``Supervisor``: the background half of the state machine (docs/ARCHITECTURE.md).

API calls only move a VM to a transitional state (PENDING, SUSPENDING, TERMINATING) with a
compare-and-set in the store and hand the real work to a task owned here; the task drives the
``HostBackend`` and finishes the transition with another compare-and-set. When two intents
race (terminate during a launch, a request during a suspend), the store decides who wins and
the loser's final CAS simply fails — nobody overwrites a newer state.

    PENDING ──launch ok──> RUNNING ──suspend──> SUSPENDING ──> SUSPENDED ──resume──> PENDING
       │  └─launch failed─> TERMINATED            │ cancelled/failed ↑          (then RUNNING)
       └──── any non-final state ──terminate──> TERMINATING ──> TERMINATED

Per VM, host operations run one at a time (``_host_lock``); deciding-and-spawning runs under
``_control`` so a flight (launch/resume/suspend task) is registered before anyone else looks.
Builds run in tasks owned here too, driven by ``builds.BuildRunner``.

In a fleet (docs/FLEET.md) the task runs on the VM's host. An API process's supervisor
(``runs_vms=False``) only writes intents: the compare-and-set, with ``placement`` choosing the
host of a resume. A host's supervisor (``fence``: its id and epoch) takes the work placed on it
with ``adopt`` (``core.fleetwork``) and drives its ``HostBackend`` as one process does; every
state it writes holds only while its epoch does. One process (``embervm server``) is both, with
no fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from embervm.contracts import MicrovmState, SuspendOutcome, VmSpec
from embervm.core.builds import BuildRunner
from embervm.core.clock import Clock, to_datetime
from embervm.core.fleetwork import ANY_HOST, FleetWork
from embervm.core.ids import state_reason
from embervm.core.limits import CoreLimits
from embervm.core.recovery import after_restart
from embervm.core.seams import HostBackend, ImageBuilder
from embervm.sizing import cpu_share
from embervm.store import (
    AdmissionLimits,
    HostFence,
    HostRegistry,
    MicrovmRecord,
    Placement,
    Repository,
    Transition,
)

log = logging.getLogger("embervm.core")

NON_FINAL: tuple[MicrovmState, ...] = ("PENDING", "RUNNING", "SUSPENDING", "SUSPENDED")
STOP_TIMEOUT = 30.0


class Supervisor(FleetWork):
    def __init__(
        self,
        *,
        repository: Repository,
        host: HostBackend,
        builder: ImageBuilder,
        clock: Clock,
        limits: CoreLimits,
        host_id: str = "local",
        fence: HostFence | None = None,
        runs_vms: bool = True,
        placement: Placement | None = None,
        hosts: HostRegistry | None = None,
    ) -> None:
        if fence is not None and fence.host_id != host_id:
            raise ValueError("a host's fence names its own host")
        self.repo = repository
        self.host = host
        self.builds = BuildRunner(
            repository=repository,
            builder=builder,
            clock=clock,
            concurrent_builds=limits.concurrent_builds,
            spawn=self.spawn,
            runs_builds=runs_vms,
            fence=fence,
            wake=lambda: self._wake_hosts(ANY_HOST),
        )
        self.clock = clock
        self.limits = limits
        self.host_id = host_id
        self.fence: HostFence | None = fence
        self.runs_vms = runs_vms
        self.placement = placement
        self.hosts: HostRegistry | None = hosts  # a fleet: wake-ups between processes
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: set[str] = set()  # VMs whose terminate task runs here
        self._flights: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._control_locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[MicrovmRecord], None]] = []

    # -- task ownership ----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guard(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed", name)

    async def start(self) -> None:
        """Reconcile what a previous run left half-done (see ``recover``)."""
        await self.recover()

    async def stop(self) -> None:
        """Cancel every background task and wait for them (bounded)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    async def idle(self) -> None:
        """Wait until no background task runs (tests; graceful drains)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def on_change(self, listener: Callable[[MicrovmRecord], None]) -> None:
        """Called with every VM record this process changed (the lifecycle's cache)."""
        self._listeners.append(listener)

    def _lock(self, table: dict[str, asyncio.Lock], vm_id: str) -> asyncio.Lock:
        lock = table.get(vm_id)
        if lock is None:
            lock = table[vm_id] = asyncio.Lock()
        return lock

    def _flight(self, vm_id: str, task: asyncio.Task[None]) -> None:
        self._flights[vm_id] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._flights.get(vm_id) is task:
                del self._flights[vm_id]

        task.add_done_callback(done)

    async def wait_flight(self, vm_id: str) -> bool:
        """Wait for the VM's launch/resume/suspend task, if one runs here. Waiters never
        cancel the flight (``shield``): one resume however many requests wait."""
        task = self._flights.get(vm_id)
        if task is None:
            return False
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        return True

    # -- store helpers -----------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.now()

    async def move(
        self, vm_id: str, expect: Iterable[MicrovmState], state: MicrovmState, **values: Any
    ) -> Transition:
        """CAS ``expect`` → ``state`` (plus ``values``); listeners hear of successes."""
        values = {"state": state, "updated_at": to_datetime(self._now()), **values}
        result = await self.repo.transition(
            vm_id, expect=tuple(expect), values=values, fence=self.fence
        )
        if result.status == "ok" and result.record is not None:
            self._notify(result.record)
        return result

    def _notify(self, record: MicrovmRecord) -> None:
        for listener in self._listeners:
            listener(record)

    async def _meter_running(self, vm: MicrovmRecord, until: float, **extra: int) -> None:
        seconds = 0.0
        if vm.running_since is not None:
            seconds = max(0.0, until - vm.running_since.timestamp())
        await self.repo.add_usage(
            vm.microvm_id,
            vcpu_seconds=seconds * cpu_share(vm.memory_mib),
            gib_seconds=seconds * vm.memory_mib / 1024.0,
            **extra,
        )

    def capacity(self) -> AdmissionLimits:
        return AdmissionLimits(
            max_microvms=self.limits.max_microvms,
            max_total_memory_mib=self.limits.max_total_memory_mib,
            host_memory_budget_mib=self.limits.host_memory_budget_mib,
            host_id=self.host_id,
            placement=self.placement,
        )

    # -- launch ------------------------------------------------------------------------------

    def start_launch(self, vm: MicrovmRecord, spec_factory: Callable[[], VmSpec]) -> None:
        """Launch a freshly admitted PENDING VM in the background (an API process of a fleet:
        its host adopts it)."""
        if not self.runs_vms:
            self._wake(vm.microvm_id)
            return
        task = self.spawn(self._launch(vm.microvm_id, spec_factory), f"launch {vm.microvm_id}")
        self._flight(vm.microvm_id, task)

    async def _launch(self, vm_id: str, spec_factory: Callable[[], VmSpec]) -> None:
        async with self._lock(self._host_locks, vm_id):
            current = await self.repo.get_microvm(vm_id)
            if current is None or current.state != "PENDING":
                return  # terminated before we started: nothing to undo
            try:
                await self.host.launch(spec_factory())
            except Exception as exc:
                log.warning("launch of %s failed: %s", vm_id, exc)
                with contextlib.suppress(Exception):
                    await self.host.terminate(vm_id)
                await self.move(
                    vm_id,
                    ["PENDING"],
                    "TERMINATED",
                    state_reason=state_reason("LaunchFailed", str(exc) or type(exc).__name__),
                    terminated_at=to_datetime(self._now()),
                )
                return
            now = to_datetime(self._now())
            # A lost CAS means a terminate came in meanwhile: its task (waiting for this
            # lock) stops the VM we just started.
            await self.move(
                vm_id,
                ["PENDING"],
                "RUNNING",
                running_since=now,
                last_activity_at=now,
                address=self.host.address(vm_id),
                state_reason=None,
            )

    # -- terminate ---------------------------------------------------------------------------

    async def terminate(self, vm_id: str, reason: str) -> Transition:
        """Move to TERMINATING and stop the VM in the background. Idempotent: a VM already
        TERMINATING/TERMINATED gives ``conflict`` with its record, which callers accept."""
        async with self._lock(self._control_locks, vm_id):
            result = await self.move(vm_id, NON_FINAL, "TERMINATING", state_reason=reason)
            if result.status == "ok":
                cancel = self._cancels.get(vm_id)
                if cancel is not None:
                    cancel.set()
                unheld = result.record is not None and result.record.host_epoch is None
                if not self.runs_vms and unheld:  # a fleet VM no host holds: nothing to stop
                    return await self.move(
                        vm_id,
                        ["TERMINATING"],
                        "TERMINATED",
                        terminated_at=to_datetime(self._now()),
                        running_since=None,
                        address=None,
                    )
                self._start_terminate(vm_id)
            return result

    def _start_terminate(self, vm_id: str) -> None:
        if not self.runs_vms:
            self._wake(vm_id)
            return
        if vm_id in self._stopping:
            return
        self._stopping.add(vm_id)
        task = self.spawn(self._terminate(vm_id), f"terminate {vm_id}")
        task.add_done_callback(lambda _: self._stopping.discard(vm_id))

    async def _terminate(self, vm_id: str) -> None:
        async with self._lock(self._host_locks, vm_id):
            try:
                await self.host.terminate(vm_id)
            except Exception as exc:
                log.warning("terminate of %s reported: %s", vm_id, exc)
            current = await self.repo.get_microvm(vm_id)
            now = self._now()
            result = await self.move(
                vm_id,
                ["TERMINATING"],
                "TERMINATED",
                terminated_at=to_datetime(now),
                running_since=None,
                address=None,
            )
            if result.status == "ok" and current is not None:
                await self._meter_running(current, now)
        self._forget(vm_id)

    def _forget(self, vm_id: str) -> None:
        self._host_locks.pop(vm_id, None)
        self._control_locks.pop(vm_id, None)

    async def vm_exited(self, vm_id: str, reason: str) -> None:
        """The host saw the VMM exit on its own (crash, kill): the VM is TERMINATED."""
        current = await self.repo.get_microvm(vm_id)
        now = self._now()
        result = await self.move(
            vm_id,
            ("PENDING", "RUNNING", "SUSPENDING"),
            "TERMINATED",
            state_reason=state_reason("VmExited", reason),
            terminated_at=to_datetime(now),
            running_since=None,
            address=None,
        )
        if result.status == "ok" and current is not None:
            await self._meter_running(current, now)
            with contextlib.suppress(Exception):
                await self.host.terminate(vm_id)

    # -- suspend -----------------------------------------------------------------------------

    async def suspend(self, vm_id: str, reason: str | None = None) -> Transition:
        async with self._lock(self._control_locks, vm_id):
            result = await self.move(vm_id, ["RUNNING"], "SUSPENDING", state_reason=reason)
            if result.status == "ok":
                self._start_suspend(vm_id)
            return result

    def _start_suspend(self, vm_id: str) -> None:
        if not self.runs_vms:
            self._wake(vm_id)
            return
        cancel = asyncio.Event()
        self._cancels[vm_id] = cancel
        task = self.spawn(self._suspend(vm_id, cancel), f"suspend {vm_id}")
        self._flight(vm_id, task)

    def cancel_suspend(self, vm_id: str) -> bool:
        """Ask a running suspend to stop (the VM keeps running). True if one was running."""
        cancel = self._cancels.get(vm_id)
        if cancel is None:
            return False
        cancel.set()
        return True

    async def _suspend(self, vm_id: str, cancel: asyncio.Event) -> None:
        terminate_after = False
        try:
            async with self._lock(self._host_locks, vm_id):
                current = await self.repo.get_microvm(vm_id)
                if current is None or current.state != "SUSPENDING":
                    return
                outcome = await self._host_suspend(current, cancel)
                if outcome is None:
                    return
                now = self._now()
                if not outcome.completed:
                    await self.move(
                        vm_id,
                        ["SUSPENDING"],
                        "RUNNING",
                        last_activity_at=to_datetime(now),
                        state_reason=None,
                    )
                    return
                result = await self.move(
                    vm_id,
                    ["SUSPENDING"],
                    "SUSPENDED",
                    suspended_at=to_datetime(now),
                    running_since=None,
                    last_snapshot_bytes=outcome.snapshot_bytes,
                )
                if result.status == "ok":
                    await self._meter_running(
                        current, now, snapshot_bytes_written=outcome.snapshot_bytes
                    )
                    policy = current.idle_policy or {}
                    terminate_after = policy.get("suspendedDurationSeconds") == 0
        finally:
            if self._cancels.get(vm_id) is cancel:
                del self._cancels[vm_id]
        if terminate_after:
            await self.terminate(vm_id, state_reason("SuspendedDurationElapsed"))

    async def _host_suspend(
        self, vm: MicrovmRecord, cancel: asyncio.Event
    ) -> SuspendOutcome | None:
        if cancel.is_set():
            return SuspendOutcome(completed=False)
        try:
            return await self.host.suspend(vm.microvm_id, cancel=cancel)
        except Exception as exc:
            log.warning("suspend of %s failed: %s", vm.microvm_id, exc)
            reason = state_reason("SuspendFailed", str(exc) or type(exc).__name__)
            now = self._now()
            if self.host.is_running(vm.microvm_id):
                await self.move(vm.microvm_id, ["SUSPENDING"], "RUNNING", state_reason=reason)
            else:
                result = await self.move(
                    vm.microvm_id,
                    ["SUSPENDING"],
                    "TERMINATED",
                    state_reason=reason,
                    terminated_at=to_datetime(now),
                    running_since=None,
                    address=None,
                )
                if result.status == "ok":
                    await self._meter_running(vm, now)
            return None

    # -- resume ------------------------------------------------------------------------------

    async def resume(self, vm_id: str) -> Transition:
        """SUSPENDED → PENDING (capacity checked) → RUNNING in the background; a VM still
        SUSPENDING has its suspend cancelled instead."""
        async with self._lock(self._control_locks, vm_id):
            current = await self.repo.get_microvm(vm_id)
            if current is None:
                return Transition("missing")
            if current.state == "SUSPENDING" and self.cancel_suspend(vm_id):
                return Transition("ok", current)
            result = await self.repo.transition(
                vm_id,
                expect=("SUSPENDED",),
                values={"state": "PENDING", "updated_at": to_datetime(self._now())},
                capacity=self.capacity(),
            )
            if result.status == "ok" and result.record is not None:
                self._notify(result.record)
                self._start_resume(vm_id)
            return result

    def _start_resume(self, vm_id: str) -> None:
        if not self.runs_vms:
            self._wake(vm_id)
            return
        task = self.spawn(self._resume(vm_id), f"resume {vm_id}")
        self._flight(vm_id, task)

    async def _resume(self, vm_id: str) -> None:
        async with self._lock(self._host_locks, vm_id):
            current = await self.repo.get_microvm(vm_id)
            if current is None or current.state != "PENDING":
                return
            try:
                await self.host.resume(vm_id)
            except Exception as exc:
                log.warning("resume of %s failed: %s", vm_id, exc)
                with contextlib.suppress(Exception):
                    await self.host.terminate(vm_id)
                await self.move(
                    vm_id,
                    ["PENDING"],
                    "TERMINATED",
                    state_reason=state_reason("ResumeFailed", str(exc) or type(exc).__name__),
                    terminated_at=to_datetime(self._now()),
                )
                return
            now = to_datetime(self._now())
            result = await self.move(
                vm_id,
                ["PENDING"],
                "RUNNING",
                running_since=now,
                last_activity_at=now,
                suspended_at=None,
                address=self.host.address(vm_id),
                state_reason=None,
            )
            if result.status == "ok":
                await self.repo.add_usage(vm_id, snapshot_bytes_read=current.last_snapshot_bytes)

    # -- recovery ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart: every VM record is made to say what the host holds
        (``recovery.after_restart``); builds that were running are failed (their build VM
        is gone)."""
        for vm in await self.repo.microvms_in_states(
            ("PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING"), host_id=self.host_id
        ):
            await self._recover_vm(vm)
        await self.builds.fail_interrupted()

    async def _recover_vm(self, vm: MicrovmRecord) -> None:
        vm_id = vm.microvm_id
        if vm.state == "TERMINATING":
            self._start_terminate(vm_id)
            return
        now = self._now()
        target = after_restart(
            vm,
            running=self.host.is_running(vm_id),
            suspended=self.host.is_suspended(vm_id),
            address=self.host.address(vm_id),
            now=to_datetime(now),
        )
        if target is None:
            return
        result = await self.move(vm_id, [vm.state], target.state, **target.values)
        if result.status == "ok" and target.metered:
            await self._meter_running(vm, now)
        if result.status == "ok" and target.state == "TERMINATED":
            with contextlib.suppress(Exception):  # whatever the host still holds of it
                await self.host.terminate(vm_id)

"""Lifecycle: idle policy, lifetimes, auto-resume — and the small object the proxy uses.

Timers live in the store, so they survive a restart:
- idle: ``last_activity_at`` + ``maxIdleDurationSeconds`` → suspend (or terminate straight
  away when ``suspendedDurationSeconds`` is 0: "terminate on suspend", no snapshot to write);
- suspended: ``suspended_at`` + ``suspendedDurationSeconds`` → terminate;
- lifetime: ``expires_at`` (start + ``maximumDurationInSeconds``) → terminate, in any state.

``record_activity`` is called by the proxy for every inbound request (only inbound traffic
counts, as on Lambda MicroVMs: docs/PROXY.md): it is an in-memory write, flushed to the store
once per tick, so the hot path costs nothing. ``ensure_running`` holds a request while a
SUSPENDED VM resumes (one resume however many callers wait) and cancels a suspend in progress
rather than waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from embervm.contracts import MicrovmState
from embervm.core.clock import Clock, to_datetime
from embervm.core.ids import connector_name, state_reason
from embervm.core.supervisor import Supervisor
from embervm.errors import ConflictError, InsufficientCapacityError, InternalError, NotFoundError
from embervm.store import MicrovmRecord, Repository

log = logging.getLogger("embervm.core.lifecycle")

DEFAULT_TICK = 1.0
DEFAULT_RESUME_TIMEOUT = 60.0
RESOLVE_TTL = 0.5
POLL_INTERVAL = 0.02


@dataclass(frozen=True)
class ResolvedVm:
    """What the proxy needs to route one request."""

    microvm_id: str
    state: MicrovmState
    ingress: frozenset[str]  # connector names: ALL_INGRESS, HTTP_INGRESS, SHELL_INGRESS...
    address: str | None  # where to connect (None unless RUNNING here)
    auto_resume: bool
    endpoint: str
    memory_mib: int = 1024  # the proxy bounds a VM's connections by its size
    host_id: str | None = None  # the host it is placed on (a fleet's proxy dials that host)

    def allows(self, kind: str) -> bool:
        """``kind`` "http" or "shell": does the VM accept that traffic at all?"""
        if "ALL_INGRESS" in self.ingress:
            return True
        return ("HTTP_INGRESS" if kind == "http" else "SHELL_INGRESS") in self.ingress


def _resolved(vm: MicrovmRecord) -> ResolvedVm:
    return ResolvedVm(
        microvm_id=vm.microvm_id,
        state=vm.state,
        ingress=frozenset(connector_name(c) for c in vm.ingress),
        address=vm.address if vm.state == "RUNNING" else None,
        auto_resume=bool((vm.idle_policy or {}).get("autoResumeEnabled")),
        endpoint=vm.endpoint,
        memory_mib=vm.memory_mib,
        host_id=vm.host_id,
    )


class Lifecycle:
    """Idle/lifetime timers (``tick``/``run``) and the proxy's view (``resolve``,
    ``ensure_running``, ``record_activity``)."""

    def __init__(
        self,
        supervisor: Supervisor,
        repository: Repository,
        clock: Clock,
        *,
        tick_interval: float = DEFAULT_TICK,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.repo = repository
        self.clock = clock
        self.tick_interval = tick_interval
        self.resume_timeout = resume_timeout
        self._activity: dict[str, float] = {}
        self._cache: dict[str, tuple[float, ResolvedVm]] = {}
        self._monotonic = monotonic or time.monotonic
        self._task: asyncio.Task[None] | None = None
        supervisor.on_change(self._changed)

    # -- the proxy's calls -------------------------------------------------------------------

    def record_activity(self, microvm_id: str) -> None:
        """An inbound request reached the VM (cheap: memory only; flushed each tick)."""
        self._activity[microvm_id] = self.clock.now()

    def resolved(self, microvm_id: str) -> ResolvedVm | None:
        """What ``resolve`` would answer without waiting (the cached view while it is fresh),
        or None: then ``resolve`` must be awaited."""
        cached = self._cache.get(microvm_id)
        if cached is not None and self._monotonic() - cached[0] < RESOLVE_TTL:
            return cached[1]
        return None

    async def resolve(self, microvm_id: str) -> ResolvedVm:
        """State, ingress connectors and address of a VM (NotFoundError if unknown)."""
        cached = self.resolved(microvm_id)
        if cached is not None:
            return cached
        vm = await self.repo.get_microvm(microvm_id)
        if vm is None:
            raise NotFoundError(f"MicroVM {microvm_id} not found")
        resolved = _resolved(vm)
        self._cache[microvm_id] = (self._monotonic(), resolved)
        return resolved

    def forget(self, microvm_id: str) -> None:
        """Drop the cached view of the VM: its host said it does not run it (a fleet's
        proxy), so the next ``resolve`` or ``resolved`` reads the store."""
        self._cache.pop(microvm_id, None)

    def _changed(self, vm: MicrovmRecord) -> None:
        self._cache[vm.microvm_id] = (self._monotonic(), _resolved(vm))

    async def ensure_running(self, microvm_id: str) -> ResolvedVm:
        """The VM, RUNNING. A SUSPENDED VM with ``autoResumeEnabled`` is resumed (single
        flight); a SUSPENDING one has its suspend cancelled; a PENDING one is waited for.
        Raises NotFoundError (unknown or terminated), ConflictError (suspended without
        auto-resume), InsufficientCapacityError, or InternalError (the resume failed)."""
        try:
            async with asyncio.timeout(self.resume_timeout):
                return await self._ensure_running(microvm_id)
        except TimeoutError as exc:
            raise InternalError(f"MicroVM {microvm_id} did not start in time") from exc

    async def _ensure_running(self, microvm_id: str) -> ResolvedVm:
        resumed = False
        while True:
            vm = await self.repo.get_microvm(microvm_id)
            if vm is None:
                raise NotFoundError(f"MicroVM {microvm_id} not found")
            if vm.state == "RUNNING":
                resolved = _resolved(vm)
                self._cache[microvm_id] = (self._monotonic(), resolved)
                return resolved
            if vm.state in ("TERMINATING", "TERMINATED"):
                if resumed:
                    raise InternalError(
                        f"MicroVM {microvm_id} could not be resumed: {vm.state_reason}"
                    )
                raise NotFoundError(f"MicroVM {microvm_id} is {vm.state}")
            if vm.state == "SUSPENDING":
                self.supervisor.cancel_suspend(microvm_id)
                await self._wait(microvm_id)
            elif vm.state == "SUSPENDED":
                if not _resolved(vm).auto_resume:
                    raise ConflictError(
                        f"MicroVM {microvm_id} is SUSPENDED and auto-resume is not enabled",
                        resourceId=microvm_id,
                        resourceType="Microvm",
                    )
                resumed = True
                await self._resume(microvm_id)
            else:  # PENDING: a launch or a resume is under way
                await self._wait(microvm_id)

    async def _resume(self, microvm_id: str) -> None:
        result = await self.supervisor.resume(microvm_id)
        if result.status == "capacity":
            raise InsufficientCapacityError(f"Not enough capacity to resume MicroVM {microvm_id}")
        if result.status == "ok":
            await self._wait(microvm_id)

    async def _wait(self, microvm_id: str) -> None:
        if not await self.supervisor.wait_flight(microvm_id):
            await asyncio.sleep(POLL_INTERVAL)  # the flight runs in another process

    # -- timers ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="lifecycle")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.flush_activity()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lifecycle tick failed")
            await self.clock.sleep(self.tick_interval)

    async def flush_activity(self) -> None:
        pending, self._activity = self._activity, {}
        for vm_id, when in pending.items():
            await self.repo.update_microvm(vm_id, {"last_activity_at": to_datetime(when)})

    def _last_activity(self, vm: MicrovmRecord) -> float:
        stored = vm.last_activity_at.timestamp() if vm.last_activity_at else 0.0
        started = vm.running_since.timestamp() if vm.running_since else 0.0
        return max(stored, started, self._activity.get(vm.microvm_id, 0.0))

    async def tick(self) -> None:
        """One pass over every live VM: flush activity, then apply the due timers."""
        await self.flush_activity()
        now = self.clock.now()
        live = await self.repo.microvms_in_states(("RUNNING", "SUSPENDED", "PENDING", "SUSPENDING"))
        for vm in live:
            if vm.expires_at.timestamp() <= now:
                await self.supervisor.terminate(
                    vm.microvm_id, state_reason("MaximumDurationReached")
                )
                continue
            policy = vm.idle_policy
            if not policy:
                continue
            if vm.state == "RUNNING":
                idle_for = now - self._last_activity(vm)
                if idle_for >= float(policy["maxIdleDurationSeconds"]):
                    await self._idle(vm, int(policy["suspendedDurationSeconds"]))
            elif vm.state == "SUSPENDED" and vm.suspended_at is not None:
                suspended_for = now - vm.suspended_at.timestamp()
                if suspended_for >= float(policy["suspendedDurationSeconds"]):
                    await self.supervisor.terminate(
                        vm.microvm_id, state_reason("SuspendedDurationElapsed")
                    )

    async def _idle(self, vm: MicrovmRecord, suspended_seconds: int) -> None:
        if suspended_seconds == 0:
            await self.supervisor.terminate(vm.microvm_id, state_reason("IdleTimeout"))
        else:
            await self.supervisor.suspend(vm.microvm_id, state_reason("IdleTimeout"))

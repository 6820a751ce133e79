"""Fakes of core's seams (``embervm.core.seams``): a clock you move by hand, a host and an
image builder that do no real work but can be held (gates) or made to fail, a token issuer,
and log sources. Used by core's unit tests and by benches/tests of layers above core.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embervm.contracts import BuildJob, BuiltImage, PortGrant, SuspendOutcome, TokenKind, VmSpec
from embervm.errors import BuildFailure, EmbervmError, VmmError


class FakeClock:
    """Wall-clock seconds you set; ``sleep`` advances time instead of waiting."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.time = start

    def now(self) -> float:
        return self.time

    def advance(self, seconds: float) -> None:
        self.time += seconds

    async def sleep(self, seconds: float) -> None:
        self.time += seconds
        await asyncio.sleep(0)


class Gates:
    """Named events a fake waits on before finishing an operation (held until released)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}

    def hold(self, name: str) -> None:
        self._events[name] = asyncio.Event()

    def release(self, name: str) -> None:
        event = self._events.pop(name, None)
        if event is not None:
            event.set()

    def event(self, name: str) -> asyncio.Event | None:
        return self._events.get(name)

    async def passing(self, name: str) -> None:
        event = self._events.get(name)
        if event is not None:
            self.waiting[name] = self.waiting.get(name, 0) + 1
            try:
                await event.wait()
            finally:
                self.waiting[name] -= 1


@dataclass
class FakeHost:
    """A ``HostBackend`` keeping VMs as set entries. ``fail[op]`` raises once; ``gates.hold(op)``
    holds every ``op`` until ``gates.release(op)``; a held suspend returns cancelled when
    its cancel event is set."""

    running: set[str] = field(default_factory=set)
    suspended: set[str] = field(default_factory=set)
    specs: dict[str, VmSpec] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: dict[str, EmbervmError] = field(default_factory=dict)
    gates: Gates = field(default_factory=Gates)
    snapshot_bytes: int = 4096

    def _maybe_fail(self, op: str) -> None:
        error = self.fail.pop(op, None)
        if error is not None:
            raise error

    def count(self, op: str, vm_id: str | None = None) -> int:
        return sum(1 for o, v in self.calls if o == op and (vm_id is None or v == vm_id))

    async def launch(self, vm: VmSpec) -> None:
        self.calls.append(("launch", vm.microvm_id))
        await self.gates.passing("launch")
        self._maybe_fail("launch")
        self.specs[vm.microvm_id] = vm
        self.running.add(vm.microvm_id)

    async def suspend(self, microvm_id: str, *, cancel: asyncio.Event) -> SuspendOutcome:
        self.calls.append(("suspend", microvm_id))
        gate = self.gates.event("suspend")
        if gate is not None:
            self.gates.waiting["suspend"] = self.gates.waiting.get("suspend", 0) + 1
            waiters = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(cancel.wait())]
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.gates.waiting["suspend"] -= 1
                for waiter in waiters:
                    waiter.cancel()
        if cancel.is_set():
            return SuspendOutcome(completed=False)
        self._maybe_fail("suspend")
        if microvm_id not in self.running:
            raise VmmError(f"{microvm_id} is not running")
        self.running.discard(microvm_id)
        self.suspended.add(microvm_id)
        return SuspendOutcome(completed=True, snapshot_bytes=self.snapshot_bytes)

    async def resume(self, microvm_id: str) -> None:
        self.calls.append(("resume", microvm_id))
        await self.gates.passing("resume")
        self._maybe_fail("resume")
        if microvm_id not in self.suspended:
            raise VmmError(f"{microvm_id} has no suspend snapshot")
        self.suspended.discard(microvm_id)
        self.running.add(microvm_id)

    async def terminate(self, microvm_id: str) -> None:
        self.calls.append(("terminate", microvm_id))
        await self.gates.passing("terminate")
        self.running.discard(microvm_id)
        self.suspended.discard(microvm_id)

    def address(self, microvm_id: str) -> str | None:
        if microvm_id not in self.running:
            return None
        return f"10.213.{len(microvm_id) % 250}.2"

    def is_running(self, microvm_id: str) -> bool:
        return microvm_id in self.running

    def is_suspended(self, microvm_id: str) -> bool:
        return microvm_id in self.suspended


@dataclass
class FakeBuilder:
    """An ``ImageBuilder`` that "builds" instantly (or when its gate is released).
    ``failures`` pops a reason per build: a non-empty one fails that build."""

    images_dir: Path
    failures: list[str] = field(default_factory=list)
    jobs: list[BuildJob] = field(default_factory=list)
    discarded: list[tuple[str, str | None]] = field(default_factory=list)
    gates: Gates = field(default_factory=Gates)

    async def build(self, job: BuildJob) -> BuiltImage:
        self.jobs.append(job)
        await self.gates.passing("build")
        reason = self.failures.pop(0) if self.failures else ""
        if reason:
            raise BuildFailure(reason)
        snapshot = self.images_dir / job.image_name / job.version / "snapshot"
        return BuiltImage(
            snapshot_dir=snapshot,
            memory_mib=job.memory_mib,
            memory_snapshot_bytes=job.memory_mib * 1024 * 1024,
            disk_snapshot_bytes=1 << 20,
            code_install_bytes=1 << 10,
        )

    async def discard(self, image_name: str, version: str | None) -> None:
        self.discarded.append((image_name, version))


@dataclass
class FakeTokens:
    issued: list[tuple[str, TokenKind, PortGrant, int]] = field(default_factory=list)

    def issue(
        self, microvm_id: str, *, kind: TokenKind, ports: PortGrant, expires_in_minutes: int
    ) -> str:
        self.issued.append((microvm_id, kind, ports, expires_in_minutes))
        return f"fake-{kind}-token-{len(self.issued)}"


@dataclass
class FakeBuildLogs:
    logs: Mapping[tuple[str, str], list[str]] = field(default_factory=dict)

    async def lines(self, image_name: str, version: str, *, follow: bool) -> AsyncIterator[str]:
        for line in self.logs.get((image_name, version), []):
            yield line


@dataclass
class FakeAppLogs:
    logs: Mapping[str, list[str]] = field(default_factory=dict)

    async def lines(self, microvm_id: str, *, follow: bool) -> AsyncIterator[str]:
        for line in self.logs.get(microvm_id, []):
            yield line

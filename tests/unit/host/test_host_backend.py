"""``host/backend.py``: ``LocalHostBackend`` over a fake ``LocalHost`` and a fake agent (real app
log files on a temp dir): hooks saved at launch and called at the right moments, failures
undone, suspends that a cancel interrupts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from embervm.contracts import SuspendOutcome, VmSpec
from embervm.errors import RuntimeFailure, VmmError
from embervm.guest.client import HttpResponse, LogLine
from embervm.host.applogs import AppLogFiles
from embervm.host.backend import LocalHostBackend, _unless_cancelled
from embervm.host.hooks import HOOK_PATH, RuntimeHooks
from embervm.host.runtime import LaunchSpec

VM = "mvm-0123456789abcdef0123"
HOOKS = {
    "port": 9000,
    "microvmHooks": {
        "run": "ENABLED",
        "resume": "ENABLED",
        "suspend": "ENABLED",
        "terminate": "ENABLED",
        "runTimeoutInSeconds": 5,
    },
}


class FakeAgent:
    """Hooks answer ``status`` (per hook, default 200); ``hold`` makes a hook wait."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.hooks: list[tuple[str, bytes]] = []
        self.hold: set[str] = set()
        self.waiting = asyncio.Event()

    async def http_request(
        self,
        port: int,
        path: str,
        *,
        body: bytes = b"",
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> HttpResponse:
        assert port == 9000
        hook = path.removeprefix(HOOK_PATH)
        self.hooks.append((hook, body))
        if hook in self.hold:
            self.waiting.set()
            await asyncio.Event().wait()
        return HttpResponse(self.status.get(hook, 200), [], b"", False)


class FakeHost:
    def __init__(self) -> None:
        self.agent_ = FakeAgent()
        self.calls: list[tuple[str, Any]] = []
        self.running: set[str] = set()
        self.fail_launch = False
        self.lines: list[bytes] = [b"hello\n"]
        self.snapshot_gate: asyncio.Event | None = None
        self.snapshot_started = asyncio.Event()
        self.commits_when_cancelled = False

    def ops(self) -> list[tuple[str, Any]]:
        """What was asked of the host, but the log readers (their pumps run concurrently)."""
        return [c for c in self.calls if c[0] != "app_logs"]

    async def launch(self, spec: LaunchSpec) -> str:
        self.calls.append(("launch", spec))
        if self.fail_launch:
            raise VmmError("no QEMU")
        self.running.add(spec.vm_id)
        return "10.0.0.1"

    async def resume(self, vm_id: str) -> None:
        self.calls.append(("resume", vm_id))
        self.running.add(vm_id)

    async def suspend(self, vm_id: str) -> int:
        self.calls.append(("suspend", vm_id))
        self.snapshot_started.set()
        if self.snapshot_gate is not None:
            try:
                await self.snapshot_gate.wait()
            except asyncio.CancelledError:
                if not self.commits_when_cancelled:
                    raise
        self.running.discard(vm_id)
        return 4096

    async def terminate(self, vm_id: str) -> None:
        self.calls.append(("terminate", vm_id))
        self.running.discard(vm_id)

    async def reattach(self, vm_ids: list[str]) -> list[str]:
        self.running.update(vm_ids[:1])
        return vm_ids[:1]

    async def adopt_suspended(self, vm_ids: list[str]) -> list[str]:
        return list(vm_ids)

    def agent(self, vm_id: str) -> FakeAgent:
        return self.agent_

    async def app_logs(self, vm_id: str) -> AsyncIterator[LogLine]:
        self.calls.append(("app_logs", vm_id))
        for i, line in enumerate(self.lines):
            yield LogLine("app", "stdout", line, 0, i)

    def is_running(self, vm_id: str) -> bool:
        return vm_id in self.running

    def is_suspended(self, vm_id: str) -> bool:
        return False

    def address(self, vm_id: str) -> str | None:
        return "10.0.0.1" if vm_id in self.running else None


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def backend(host: FakeHost, tmp_path: Path) -> LocalHostBackend:
    return LocalHostBackend(host, AppLogFiles(tmp_path / "logs"))  # type: ignore[arg-type]


def _spec(hooks: dict[str, Any] | None = HOOKS, payload: str | None = '{"user": 1}') -> VmSpec:
    return VmSpec(VM, Path("/images/web/1/snapshot"), True, hooks, payload)


def _hooks_file(backend: LocalHostBackend) -> Path:
    return backend.logs.root / f"{VM}.hooks.json"


# -- launch ----------------------------------------------------------------------------------


async def test_launch_saves_the_hooks_runs_the_run_hook_and_pumps_the_logs(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    assert host.calls[0] == ("launch", LaunchSpec(VM, Path("/images/web/1/snapshot"), True))
    assert host.agent_.hooks == [("run", b'{"user": 1}')]
    saved = json.loads(_hooks_file(backend).read_text())
    assert (saved["port"], saved["timeouts"]["run"]) == (9000, 5.0)
    await backend.logs.drain(VM)
    assert (backend.logs.root / f"{VM}.log").read_text() == "hello\n"


async def test_without_hooks_nothing_is_called_in_the_guest(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec(hooks=None, payload=None))
    await backend.suspend(VM, cancel=asyncio.Event())
    await backend.resume(VM)
    await backend.terminate(VM)
    assert host.agent_.hooks == []


async def test_a_launch_that_fails_leaves_no_hooks_file(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    host.fail_launch = True
    with pytest.raises(VmmError):
        await backend.launch(_spec())
    assert not _hooks_file(backend).exists()
    assert host.agent_.hooks == []


async def test_a_failed_run_hook_terminates_the_vm_without_its_terminate_hook(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    host.agent_.status["run"] = 500
    with pytest.raises(RuntimeFailure, match=r"the run hook failed: .*HTTP 500"):
        await backend.launch(_spec())
    assert [h for h, _ in host.agent_.hooks] == ["run"]
    assert ("terminate", VM) in host.calls
    assert not _hooks_file(backend).exists()
    assert (backend.logs.root / f"{VM}.end").exists()  # followers of its log stop


# -- resume ----------------------------------------------------------------------------------


async def test_hooks_saved_at_launch_are_used_after_a_restart(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    restarted = LocalHostBackend(host, AppLogFiles(backend.logs.root))  # type: ignore[arg-type]
    await restarted.resume(VM)
    assert [h for h, _ in host.agent_.hooks] == ["run", "resume"]


async def test_a_failed_resume_hook_terminates_the_vm(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    host.agent_.status["resume"] = 503
    with pytest.raises(RuntimeFailure, match="the resume hook failed"):
        await backend.resume(VM)
    assert host.ops()[-1] == ("terminate", VM)
    assert "terminate" not in [h for h, _ in host.agent_.hooks]


# -- suspend ---------------------------------------------------------------------------------


async def test_suspend_calls_the_hook_then_snapshots(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    outcome = await backend.suspend(VM, cancel=asyncio.Event())
    assert outcome == SuspendOutcome(completed=True, snapshot_bytes=4096)
    assert [h for h, _ in host.agent_.hooks] == ["run", "suspend"]
    assert host.ops()[-1] == ("suspend", VM)


async def test_a_failed_suspend_hook_does_not_stop_the_suspend(
    backend: LocalHostBackend, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RuntimeHooks, "timeout", lambda _self, _hook: 0.05)  # retried till then
    await backend.launch(_spec({**HOOKS, "microvmHooks": {"suspend": "ENABLED"}}))
    host.agent_.status["suspend"] = 500
    outcome = await backend.suspend(VM, cancel=asyncio.Event())
    assert outcome.completed
    assert host.ops()[-1] == ("suspend", VM)


async def test_a_suspend_cancelled_before_it_starts_does_nothing(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    cancel = asyncio.Event()
    cancel.set()
    assert await backend.suspend(VM, cancel=cancel) == SuspendOutcome(completed=False)
    assert [h for h, _ in host.agent_.hooks] == ["run"]
    assert ("suspend", VM) not in host.calls


async def test_a_cancel_during_the_hook_abandons_it_and_takes_no_snapshot(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    host.agent_.hold.add("suspend")
    cancel = asyncio.Event()
    suspending = asyncio.create_task(backend.suspend(VM, cancel=cancel))
    await host.agent_.waiting.wait()
    cancel.set()
    assert await suspending == SuspendOutcome(completed=False)
    assert ("suspend", VM) not in host.calls
    assert VM in host.running


@pytest.mark.parametrize("committed", [False, True])
async def test_a_cancel_during_the_snapshot_undoes_it_unless_it_committed(
    backend: LocalHostBackend, host: FakeHost, committed: bool
) -> None:
    await backend.launch(_spec(hooks=None))
    host.snapshot_gate = asyncio.Event()  # never set: the snapshot waits for the cancel
    host.commits_when_cancelled = committed
    cancel = asyncio.Event()
    suspending = asyncio.create_task(backend.suspend(VM, cancel=cancel))
    await host.snapshot_started.wait()
    cancel.set()
    outcome = await suspending
    assert outcome == (
        SuspendOutcome(completed=True, snapshot_bytes=4096)
        if committed
        else SuspendOutcome(completed=False)
    )


async def test_unless_cancelled_raises_the_tasks_error() -> None:
    async def fail() -> None:
        raise VmmError("snapshot failed")

    with pytest.raises(VmmError, match="snapshot failed"):
        await _unless_cancelled(asyncio.create_task(fail()), asyncio.Event())


async def test_unless_cancelled_takes_its_task_along_when_cancelled() -> None:
    inner = asyncio.create_task(asyncio.Event().wait())
    outer = asyncio.create_task(_unless_cancelled(inner, asyncio.Event()))
    await asyncio.sleep(0)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner.cancelled()


# -- terminate, recover ----------------------------------------------------------------------


async def test_terminate_calls_the_hook_of_a_running_vm_and_forgets_it(
    backend: LocalHostBackend, host: FakeHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RuntimeHooks, "timeout", lambda _self, _hook: 0.05)  # retried till then
    await backend.launch(_spec())
    host.agent_.status["terminate"] = 500  # answered wrongly: terminated anyway
    await backend.terminate(VM)
    assert [h for h, _ in host.agent_.hooks][-1] == "terminate"
    assert host.ops()[-1] == ("terminate", VM)
    assert not _hooks_file(backend).exists()
    assert (backend.logs.root / f"{VM}.end").exists()


async def test_terminate_of_a_suspended_vm_calls_no_hook(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    await backend.launch(_spec())
    await backend.suspend(VM, cancel=asyncio.Event())
    await backend.terminate(VM)
    assert [h for h, _ in host.agent_.hooks] == ["run", "suspend"]


async def test_recover_returns_every_vm_held_again_and_pumps_the_running_ones(
    backend: LocalHostBackend, host: FakeHost
) -> None:
    other = "mvm-ffffffffffffffffffff"
    assert await backend.recover([VM, other], ["mvm-aaaaaaaaaaaaaaaaaaaa"]) == [
        VM,
        "mvm-aaaaaaaaaaaaaaaaaaaa",
    ]
    await backend.logs.drain(VM)
    assert [c for c in host.calls if c[0] == "app_logs"] == [("app_logs", VM)]
    assert backend.address(VM) == "10.0.0.1"
    assert backend.is_running(VM)
    assert not backend.is_running(other)
    assert not backend.is_suspended(VM)

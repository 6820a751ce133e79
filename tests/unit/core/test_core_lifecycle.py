"""Lifecycle: idle suspend, suspended/maximum durations, auto-resume, restart recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.framework.core_unit_harness import ALL_INGRESS, Rig, make_rig, until
from tests.framework.fake_core import FakeClock, FakeHost

from embervm.errors import ConflictError, InternalError, NotFoundError, VmmError


def policy(idle: int = 60, suspended: int = 600, auto: bool = True) -> dict[str, Any]:
    return {
        "maxIdleDurationSeconds": idle,
        "suspendedDurationSeconds": suspended,
        "autoResumeEnabled": auto,
    }


async def tick(rig: Rig) -> None:
    await rig.ops.lifecycle.tick()
    await rig.settle()


async def test_idle_vm_is_suspended_after_max_idle(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60)))["microvmId"]
    rig.clock.advance(59)
    await tick(rig)
    before = await rig.state(vm_id)
    rig.clock.advance(1)
    await tick(rig)
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (before, vm["state"], vm["stateReason"]) == ("RUNNING", "SUSPENDED", "IdleTimeout")


async def test_inbound_activity_postpones_idle_suspend(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60)))["microvmId"]
    rig.clock.advance(50)
    rig.ops.lifecycle.record_activity(vm_id)
    rig.clock.advance(50)
    await tick(rig)
    assert await rig.state(vm_id) == "RUNNING"
    rig.clock.advance(10)
    await tick(rig)
    assert await rig.state(vm_id) == "SUSPENDED"


async def test_vm_without_idle_policy_is_never_suspended(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    rig.clock.advance(7 * 3600)
    await tick(rig)
    assert await rig.state(vm_id) == "RUNNING"


async def test_suspended_vm_is_terminated_after_suspended_duration(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60, suspended=300)))["microvmId"]
    rig.clock.advance(60)
    await tick(rig)
    rig.clock.advance(299)
    await tick(rig)
    before = await rig.state(vm_id)
    rig.clock.advance(1)
    await tick(rig)
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (before, vm["state"]) == ("SUSPENDED", "TERMINATED")
    assert vm["stateReason"] == "SuspendedDurationElapsed"


async def test_zero_suspended_duration_terminates_instead_of_suspending(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60, suspended=0)))["microvmId"]
    rig.clock.advance(60)
    await tick(rig)
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (vm["state"], vm["stateReason"]) == ("TERMINATED", "IdleTimeout")
    assert rig.host.count("suspend", vm_id) == 0


async def test_explicit_suspend_with_zero_suspended_duration_terminates(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60, suspended=0)))["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    assert await rig.state(vm_id) == "TERMINATED"


@pytest.mark.parametrize("suspend_first", [False, True])
async def test_vm_is_terminated_at_maximum_duration(rig: Rig, suspend_first: bool) -> None:
    await rig.image()
    vm_id = (await rig.run(maximumDurationInSeconds=3600))["microvmId"]
    if suspend_first:
        await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
        await rig.settle()
    rig.clock.advance(3599)
    await tick(rig)
    before = await rig.state(vm_id)
    rig.clock.advance(1)
    await tick(rig)
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert before != "TERMINATED"
    assert (vm["state"], vm["stateReason"]) == ("TERMINATED", "MaximumDurationReached")


async def test_auto_resume_is_a_single_flight_for_many_waiters(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy()))["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    rig.host.gates.hold("resume")
    waiters = [asyncio.create_task(rig.ops.lifecycle.ensure_running(vm_id)) for _ in range(20)]
    await until(lambda: rig.host.gates.waiting.get("resume", 0) > 0)
    rig.host.gates.release("resume")
    results = await asyncio.gather(*waiters)
    assert {r.state for r in results} == {"RUNNING"}
    assert {r.address for r in results} == {rig.host.address(vm_id)}
    assert rig.host.count("resume", vm_id) == 1


async def test_request_during_suspend_cancels_it(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy()))["microvmId"]
    rig.host.gates.hold("suspend")
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await until(lambda: rig.host.gates.waiting.get("suspend", 0) > 0)
    resolved = await rig.ops.lifecycle.ensure_running(vm_id)
    await rig.settle()
    assert resolved.state == "RUNNING"
    assert rig.host.is_running(vm_id)
    assert rig.host.count("resume") == 0
    rig.host.gates.release("suspend")


async def test_ensure_running_waits_for_a_pending_launch(rig: Rig) -> None:
    await rig.image()
    rig.host.gates.hold("launch")
    vm_id = (await rig.call("RunMicrovm", {"imageIdentifier": "web"}))["microvmId"]
    waiter = asyncio.create_task(rig.ops.lifecycle.ensure_running(vm_id))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    rig.host.gates.release("launch")
    assert (await waiter).state == "RUNNING"


async def test_suspended_vm_without_auto_resume_is_not_resumed(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(auto=False)))["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    with pytest.raises(ConflictError):
        await rig.ops.lifecycle.ensure_running(vm_id)
    assert rig.host.count("resume") == 0


async def test_failed_auto_resume_is_an_internal_error(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy()))["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    rig.host.fail["resume"] = VmmError("restore failed")
    with pytest.raises(InternalError):
        await rig.ops.lifecycle.ensure_running(vm_id)


async def test_ensure_running_of_unknown_or_terminated_vm_is_not_found(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    for target in (vm_id, "mvm-00000000000000000000"):
        with pytest.raises(NotFoundError):
            await rig.ops.lifecycle.ensure_running(target)


async def test_resolve_gives_ingress_and_address(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(ingressNetworkConnectors=[ALL_INGRESS], idlePolicy=policy()))[
        "microvmId"
    ]
    resolved = await rig.ops.lifecycle.resolve(vm_id)
    assert resolved.ingress == frozenset({"ALL_INGRESS"})
    assert resolved.address == rig.host.address(vm_id)
    assert resolved.auto_resume
    assert resolved.allows("shell")
    assert resolved.allows("http")


async def test_resolve_reflects_a_suspend_done_by_this_process(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy()))["microvmId"]
    await rig.ops.lifecycle.resolve(vm_id)
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    resolved = await rig.ops.lifecycle.resolve(vm_id)
    assert (resolved.state, resolved.address) == ("SUSPENDED", None)


async def test_resolved_answers_without_waiting_only_while_the_view_is_fresh(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy()))["microvmId"]
    fresh = await rig.ops.lifecycle.resolve(vm_id)
    assert rig.ops.lifecycle.resolved(vm_id) == fresh
    assert rig.ops.lifecycle.resolved("mvm-00000000000000000000") is None
    rig.ops.lifecycle._cache[vm_id] = (-1e9, fresh)  # as if resolved long ago
    assert rig.ops.lifecycle.resolved(vm_id) is None


async def _restart(rig: Rig, tmp_path: Path, clock: FakeClock) -> Rig:
    """A second Operations over the same data dir and database (the first one stopped)."""
    await rig.ops.lifecycle.flush_activity()
    await rig.ops.stop()
    await rig.repo.close()
    host = FakeHost(running=set(rig.host.running), suspended=set(rig.host.suspended))
    return await make_rig(tmp_path, clock=clock, host=host)


async def test_idle_timer_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    rig = await make_rig(tmp_path, clock=clock)
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=120)))["microvmId"]
    clock.advance(100)
    rig.ops.lifecycle.record_activity(vm_id)
    again = await _restart(rig, tmp_path, clock)
    try:
        clock.advance(100)
        await tick(again)
        still = await again.state(vm_id)
        clock.advance(20)
        await tick(again)
        assert (still, await again.state(vm_id)) == ("RUNNING", "SUSPENDED")
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_suspended_timer_survives_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    rig = await make_rig(tmp_path, clock=clock)
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60, suspended=300)))["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    again = await _restart(rig, tmp_path, clock)
    try:
        clock.advance(300)
        await tick(again)
        assert await again.state(vm_id) == "TERMINATED"
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_restart_marks_vms_the_host_lost_as_terminated(tmp_path: Path) -> None:
    clock = FakeClock()
    rig = await make_rig(tmp_path, clock=clock)
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    rig.host.running.clear()  # the host lost it (e.g. VMMs killed with the server)
    again = await _restart(rig, tmp_path, clock)
    try:
        vm = await again.call("GetMicrovm", {"microvmIdentifier": vm_id})
        assert (vm["state"], vm["stateReason"].split(":")[0]) == ("TERMINATED", "HostRestarted")
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_restart_fails_builds_that_were_running(tmp_path: Path) -> None:
    clock = FakeClock()
    rig = await make_rig(tmp_path, clock=clock)
    rig.builder.gates.hold("build")
    await rig.call(
        "CreateMicrovmImage",
        {
            "name": "web",
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
            "buildRoleArn": "arn:aws:iam::123456789012:role/build",
            "codeArtifact": {"uri": "file:///tmp/app.zip"},
        },
    )
    await until(lambda: rig.builder.gates.waiting.get("build", 0) > 0)
    again = await _restart(rig, tmp_path, clock)
    try:
        image = await again.call("GetMicrovmImage", {"imageIdentifier": "web"})
        version = await again.call(
            "GetMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "1"}
        )
        assert image["state"] == "CREATE_FAILED"
        assert (version["state"], version["stateReason"]) == (
            "FAILED",
            "the server restarted during the build",
        )
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_lifecycle_loop_runs_ticks_on_its_clock(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(idlePolicy=policy(idle=60)))["microvmId"]
    await rig.ops.lifecycle.start()
    try:
        for _ in range(1000):
            if await rig.state(vm_id) != "RUNNING":
                break
            await asyncio.sleep(0)
    finally:
        await rig.ops.lifecycle.stop()
    await rig.settle()
    assert await rig.state(vm_id) == "SUSPENDED"

"""Restart recovery: a server killed inside a suspend or resume leaves a transitional record;
the next start moves it to the one stable state that matches what the host took back
(``core.recovery``). The real-server version of these cases is
``tests/integration/chaos/test_chaos_server_kill.py``."""

from __future__ import annotations

from pathlib import Path

from tests.framework.core_unit_harness import Rig, make_rig, until
from tests.framework.fake_core import FakeClock, FakeHost


async def _killed_then_restarted(
    rig: Rig, tmp_path: Path, *, running: set[str], suspended: set[str]
) -> Rig:
    """The first Operations dies mid-operation (its tasks cancelled, nothing finished); the
    host of the next run holds ``running`` and ``suspended``."""
    await rig.ops.stop()
    await rig.repo.close()
    return await make_rig(
        tmp_path, clock=rig.clock, host=FakeHost(running=running, suspended=suspended)
    )


async def _suspending_vm(rig: Rig) -> str:
    await rig.image()
    vm_id = str((await rig.run())["microvmId"])
    rig.host.gates.hold("suspend")
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await until(lambda: rig.host.gates.waiting.get("suspend") == 1)
    assert await rig.state(vm_id) == "SUSPENDING"
    return vm_id


async def _resuming_vm(rig: Rig) -> str:
    await rig.image()
    vm_id = str((await rig.run())["microvmId"])
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    rig.host.gates.hold("resume")
    await rig.call("ResumeMicrovm", {"microvmIdentifier": vm_id})
    await until(lambda: rig.host.gates.waiting.get("resume") == 1)
    assert await rig.state(vm_id) == "PENDING"
    return vm_id


async def test_a_suspend_that_committed_before_the_kill_is_suspended(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, clock=FakeClock())
    vm_id = await _suspending_vm(rig)
    again = await _killed_then_restarted(rig, tmp_path, running=set(), suspended={vm_id})
    try:
        assert await again.state(vm_id) == "SUSPENDED"
        await again.call("ResumeMicrovm", {"microvmIdentifier": vm_id})
        await again.settle()
        assert await again.state(vm_id) == "RUNNING"
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_a_suspend_cut_short_leaves_the_vm_running(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, clock=FakeClock())
    vm_id = await _suspending_vm(rig)
    again = await _killed_then_restarted(rig, tmp_path, running={vm_id}, suspended=set())
    try:
        vm = await again.call("GetMicrovm", {"microvmIdentifier": vm_id})
        assert vm["state"] == "RUNNING"
        assert "stateReason" not in vm
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_a_resume_that_never_ran_is_suspended_unless_its_snapshot_is_gone(
    tmp_path: Path,
) -> None:
    rig = await make_rig(tmp_path, clock=FakeClock())
    vm_id = await _resuming_vm(rig)
    again = await _killed_then_restarted(rig, tmp_path, running=set(), suspended={vm_id})
    try:
        assert await again.state(vm_id) == "SUSPENDED"
    finally:
        await again.ops.stop()
        await again.repo.close()
    third = await _killed_then_restarted(again, tmp_path, running=set(), suspended=set())
    try:  # nothing held at all: the record may not claim a snapshot
        vm = await third.call("GetMicrovm", {"microvmIdentifier": vm_id})
        assert (vm["state"], vm["stateReason"].split(":")[0]) == ("TERMINATED", "HostRestarted")
    finally:
        await third.ops.stop()
        await third.repo.close()


async def test_a_suspended_vm_whose_snapshot_is_gone_is_terminated(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, clock=FakeClock())
    await rig.image()
    vm_id = str((await rig.run())["microvmId"])
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    again = await _killed_then_restarted(rig, tmp_path, running=set(), suspended=set())
    try:
        vm = await again.call("GetMicrovm", {"microvmIdentifier": vm_id})
        assert (vm["state"], vm["stateReason"].split(":")[0]) == ("TERMINATED", "HostRestarted")
        assert "snapshot" in vm["stateReason"]
    finally:
        await again.ops.stop()
        await again.repo.close()


async def test_a_resume_that_got_through_is_running(tmp_path: Path) -> None:
    rig = await make_rig(tmp_path, clock=FakeClock())
    vm_id = await _resuming_vm(rig)
    again = await _killed_then_restarted(rig, tmp_path, running={vm_id}, suspended=set())
    try:
        assert await again.state(vm_id) == "RUNNING"
    finally:
        await again.ops.stop()
        await again.repo.close()

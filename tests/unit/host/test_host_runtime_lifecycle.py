"""``host/runtime.py``: ``LocalHost`` launching, suspending, resuming and terminating VMs over a
fake VMM, network and agent (snapshot manifests faked): what each step asks of them, what a
failure undoes, and a VMM that exits on its own reported once."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from tests.framework.host_vm_fakes import SNAPSHOT, VM, HostRig, manifest

from embervm.errors import GuestError, NotFoundError, VmmError
from embervm.host.runtime import LaunchSpec


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostRig:
    return HostRig(tmp_path, monkeypatch)


async def _launched(rig: HostRig, vm_id: str = VM) -> str:
    return await rig.host.launch(LaunchSpec(vm_id, SNAPSHOT, egress=True))


# -- launch ----------------------------------------------------------------------------------


async def test_launch_restores_the_image_snapshot_in_a_private_folder(rig: HostRig) -> None:
    rig.snapshot_memory = 2048
    address = await _launched(rig)
    assert address == rig.network.live[VM].vm_address == rig.host.address(VM)
    ((call, cfg, snapshot_dir, consume),) = rig.vmm.calls
    assert (call, snapshot_dir, consume) == ("restore", SNAPSHOT, False)
    assert (cfg.memory_mib, cfg.netns, cfg.workdir) == (2048, "emb-ns1", rig.workdir())
    assert rig.network.live[VM].egress
    assert rig.agents.calls == [(cfg.agent_socket, True)]
    assert stat.S_IMODE(rig.workdir().stat().st_mode) == 0o700
    assert rig.process_record() == {"pid": rig.vmm.processes[0].pid, "memory_mib": 2048}
    assert rig.host.is_running(VM)
    assert not rig.host.is_suspended(VM)


async def test_a_vm_id_runs_once(rig: HostRig) -> None:
    await _launched(rig)
    with pytest.raises(VmmError, match="already runs on this host"):
        await _launched(rig)
    assert len(rig.vmm.processes) == 1


@pytest.mark.parametrize("failing", ["restore", "agent"])
async def test_a_launch_that_fails_leaves_nothing_behind(rig: HostRig, failing: str) -> None:
    if failing == "restore":
        rig.vmm.fail.add("restore")
    else:
        rig.agents.fail = True
    with pytest.raises((VmmError, GuestError)):
        await _launched(rig)
    assert not rig.workdir().exists()
    assert rig.network.live == {}
    assert not rig.host.is_running(VM)
    assert rig.host.address(VM) is None
    if failing == "agent":
        assert rig.vmm.processes[0].calls == ["kill"]


# -- suspend ---------------------------------------------------------------------------------


async def test_suspend_quiesces_snapshots_and_keeps_the_network(rig: HostRig) -> None:
    await _launched(rig)
    process, agent = rig.vmm.processes[0], rig.agents.agents[0]
    process.snapshot_manifest = manifest(kind="delta", files={"device.state": 10, "memory": 90})
    watcher = rig.host._vms[VM].watcher
    assert watcher is not None
    assert await rig.host.suspend(VM) == 100
    assert process.calls == [f"snapshot {rig.workdir() / 'suspend'}"]
    assert agent.calls == ["quiesce", "close"]
    assert rig.host.is_suspended(VM)
    assert not rig.host.is_running(VM)
    assert VM in rig.network.live
    await watcher  # it saw the exit the suspend expected
    assert rig.exits == []


async def test_a_failed_snapshot_thaws_the_guest_and_it_runs_on(rig: HostRig) -> None:
    await _launched(rig)
    process, agent = rig.vmm.processes[0], rig.agents.agents[0]
    process.snapshot_error = VmmError("disk full")
    with pytest.raises(VmmError, match="disk full"):
        await rig.host.suspend(VM)
    assert agent.calls == ["quiesce", "thaw"]
    assert rig.host.is_running(VM)
    process.crash()  # a later crash is still reported: the exit is no longer expected
    await rig.exited.wait()
    assert rig.exits[0][0] == VM


async def test_a_cancelled_suspend_thaws_the_guest(rig: HostRig) -> None:
    await _launched(rig)
    process, agent = rig.vmm.processes[0], rig.agents.agents[0]
    process.snapshot_gate = asyncio.Event()
    suspending = asyncio.create_task(rig.host.suspend(VM))
    await process.snapshot_started.wait()
    suspending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await suspending
    assert agent.calls == ["quiesce", "thaw"]
    assert rig.host.is_running(VM)


async def test_only_a_running_vm_is_suspended(rig: HostRig) -> None:
    with pytest.raises(NotFoundError):
        await rig.host.suspend(VM)
    await _launched(rig)
    await rig.host.suspend(VM)
    with pytest.raises(VmmError, match="is not running"):
        await rig.host.suspend(VM)


# -- resume ----------------------------------------------------------------------------------


async def test_resume_restores_the_vms_own_snapshot_and_consumes_it(rig: HostRig) -> None:
    await _launched(rig)
    await rig.host.suspend(VM)
    (rig.workdir() / "suspend").mkdir()
    await rig.host.resume(VM)
    call, cfg, snapshot_dir, consume = rig.vmm.calls[-1]
    assert (call, snapshot_dir, consume) == ("restore", rig.workdir() / "suspend", True)
    assert cfg.netns == "emb-ns1"  # the same network: the VM keeps its address
    assert rig.manifests[-1] == (rig.workdir() / "suspend", {"verify_hashes": False})
    assert rig.process_record()["pid"] == rig.vmm.processes[1].pid
    assert rig.host.is_running(VM)
    assert rig.network.calls == [("create", VM)]


async def test_a_running_vm_is_not_resumed(rig: HostRig) -> None:
    await _launched(rig)
    with pytest.raises(VmmError, match="already running"):
        await rig.host.resume(VM)


async def test_a_resume_whose_agent_does_not_answer_kills_the_new_vmm_quietly(rig: HostRig) -> None:
    await _launched(rig)
    await rig.host.suspend(VM)
    (rig.workdir() / "suspend").mkdir()
    rig.agents.fail = True
    with pytest.raises(GuestError):
        await rig.host.resume(VM)
    assert rig.vmm.processes[1].calls == ["kill"]
    assert rig.host.is_suspended(VM) is False  # it holds a dead process, not a snapshot


# -- exits and terminate ---------------------------------------------------------------------


async def test_a_vmm_that_exits_on_its_own_is_reported_and_cleaned_up(rig: HostRig) -> None:
    await _launched(rig)
    rig.vmm.processes[0].crash("killed by signal 9 (OOM)")
    await rig.exited.wait()
    assert rig.exits == [(VM, "the VMM exited unexpectedly: killed by signal 9 (OOM)")]
    assert not rig.workdir().exists()
    assert rig.network.live == {}
    assert rig.agents.agents[0].closed
    assert rig.host.address(VM) is None


async def test_terminate_stops_the_vmm_releases_everything_and_is_idempotent(rig: HostRig) -> None:
    await _launched(rig)
    process = rig.vmm.processes[0]
    watcher = rig.host._vms[VM].watcher
    assert watcher is not None
    await rig.host.terminate(VM)
    await rig.host.terminate(VM)
    assert process.calls == ["stop"]
    assert not rig.workdir().exists()
    assert rig.network.calls == [("create", VM), ("destroy", VM)]
    await watcher
    assert rig.exits == []


async def test_a_vmm_that_does_not_stop_is_killed(rig: HostRig) -> None:
    await _launched(rig)
    process = rig.vmm.processes[0]
    process.stop_error = VmmError("QMP quit timed out")
    await rig.host.terminate(VM)
    assert process.calls == ["stop", "kill"]


async def test_terminate_of_a_suspended_vm_removes_its_snapshot(rig: HostRig) -> None:
    await _launched(rig)
    await rig.host.suspend(VM)
    await rig.host.terminate(VM)
    assert not rig.workdir().exists()
    assert rig.network.live == {}


async def test_shutdown_terminates_running_vms_and_leaves_suspended_ones(rig: HostRig) -> None:
    other = "mvm-ffffffffffffffffffff"
    await _launched(rig)
    await _launched(rig, other)
    await rig.host.suspend(other)
    await rig.host.shutdown()
    assert not rig.workdir().exists()
    assert rig.workdir(other).exists()  # its snapshot is adopted after the restart
    assert not rig.host.is_suspended(other)  # but this host holds nothing any more


# -- inside the guest ------------------------------------------------------------------------


async def test_guest_calls_go_to_the_vms_agent_and_fail_while_suspended(rig: HostRig) -> None:
    await _launched(rig)
    agent = rig.agents.agents[0]
    agent.lines = [b"one\n", b"two\n"]
    await rig.host.start_app(VM, object())  # type: ignore[arg-type]
    assert await rig.host.open_shell(VM, cols=100, rows=40) == "pty"
    assert [line.line async for line in rig.host.app_logs(VM)] == [b"one\n", b"two\n"]
    assert rig.host.agent(VM) is agent
    assert agent.calls == ["start_app", "pty 100x40"]
    await rig.host.suspend(VM)
    with pytest.raises(GuestError, match="has no agent connection"):
        rig.host.agent(VM)
    with pytest.raises(NotFoundError):
        rig.host.agent("mvm-aaaaaaaaaaaaaaaaaaaa")

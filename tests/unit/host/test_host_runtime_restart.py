"""``host/runtime.py`` across a server restart, over a fake VMM, network and agent: running VMMs
let go of and re-attached (the right pid, an interrupted suspend undone), suspended VMs
adopted (a committed snapshot wins), leftovers reclaimed; and the bytes a snapshot wrote."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tests.framework.host_vm_fakes import SNAPSHOT, VM, HostRig, manifest

from embervm.host import runtime
from embervm.host._boot import vm_dir_name
from embervm.host.runtime import LaunchSpec, _read_process, _record_process, written_bytes

OTHER = "mvm-ffffffffffffffffffff"


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HostRig:
    return HostRig(tmp_path, monkeypatch)


@pytest.fixture
def live_vmms(monkeypatch: pytest.MonkeyPatch) -> dict[Path, list[int]]:
    """The VMM pids ``vmm_pids`` finds per VM folder (none unless set); ``kill_vmms`` empties
    a folder's list."""
    live: dict[Path, list[int]] = {}
    monkeypatch.setattr(runtime, "vmm_pids", lambda workdir: list(live.get(workdir, [])))

    def kill(workdir: Path) -> list[int]:
        return live.pop(workdir, [])

    monkeypatch.setattr(runtime, "kill_vmms", kill)
    return live


async def _left_running(rig: HostRig, vm_id: str = VM, pid: int = 777, memory: int = 1024) -> Path:
    """What a dead run leaves of a running VM: its folder, process.json and network."""
    workdir = rig.workdir(vm_id)
    workdir.mkdir(parents=True)
    _record_process(workdir, pid, memory)
    await rig.network.create(vm_id, egress=True)
    return workdir


def _left_suspended(rig: HostRig, vm_id: str = VM) -> Path:
    workdir = rig.workdir(vm_id)
    (workdir / "suspend").mkdir(parents=True)
    return workdir


# -- detach ----------------------------------------------------------------------------------


async def test_detach_lets_running_vmms_go_without_stopping_them(rig: HostRig) -> None:
    await rig.host.launch(LaunchSpec(VM, SNAPSHOT))
    await rig.host.launch(LaunchSpec(OTHER, SNAPSHOT))
    await rig.host.suspend(OTHER)
    running = rig.vmm.processes[0]
    watcher = rig.host._vms[VM].watcher
    assert await rig.host.detach_all() == [VM]
    assert running.calls == ["detach"]
    assert rig.agents.agents[0].closed
    assert watcher is not None
    with pytest.raises(asyncio.CancelledError):
        await watcher
    running.crash()  # after the detach the VMM is no longer this run's business
    assert rig.exits == []
    assert rig.workdir().exists()
    assert VM in rig.network.live
    assert not rig.host.is_running(VM)


# -- reattach --------------------------------------------------------------------------------


async def test_a_running_vm_is_reattached_by_its_recorded_pid(
    rig: HostRig, live_vmms: dict[Path, list[int]]
) -> None:
    workdir = await _left_running(rig, pid=777, memory=1024)
    live_vmms[workdir] = [777]
    assert await rig.host.reattach([VM]) == [VM]
    ((call, cfg, pid),) = rig.vmm.calls
    assert (call, pid, cfg.memory_mib, cfg.netns) == ("attach", 777, 1024, "emb-ns1")
    assert rig.agents.calls == [(cfg.agent_socket, False)]
    assert rig.vmm.processes[0].calls == []  # it was running: nothing to undo
    assert rig.agents.agents[0].calls == []
    assert rig.host.is_running(VM)
    rig.vmm.processes[0].crash("segfault")  # and it is watched again
    await rig.exited.wait()
    assert rig.exits == [(VM, "the VMM exited unexpectedly: segfault")]


@pytest.mark.parametrize(
    ("live", "attached"),
    [
        ([888], 888),  # a resume cut short: the one live VMM, not yet recorded
        ([], 777),  # none found: the record is tried (attach says if it is gone)
        ([888, 999], 777),  # two: no guessing
        ([777, 888], 777),
    ],
)
async def test_the_pid_to_attach_to(
    rig: HostRig, live_vmms: dict[Path, list[int]], live: list[int], attached: int
) -> None:
    workdir = await _left_running(rig, pid=777)
    live_vmms[workdir] = live
    await rig.host.reattach([VM])
    assert rig.vmm.calls[0][2] == attached
    assert _read_process(workdir) == (attached, 1024)


@pytest.mark.usefixtures("live_vmms")
async def test_a_guest_stopped_mid_suspend_is_resumed_and_thawed(rig: HostRig) -> None:
    workdir = await _left_running(rig)
    (workdir / ".suspend.tmp-1234").mkdir()  # the half-written snapshot

    real_attach = rig.vmm.attach

    async def attach_paused(cfg: Any, pid: int) -> Any:
        process = await real_attach(cfg, pid)
        process.state = "paused (postmigrate)"
        return process

    rig.vmm.attach = attach_paused  # type: ignore[method-assign]
    assert await rig.host.reattach([VM]) == [VM]
    assert rig.vmm.processes[0].calls == ["cancel_migration", "cont"]
    assert rig.agents.agents[0].calls == ["thaw"]
    assert not (workdir / ".suspend.tmp-1234").exists()


@pytest.mark.usefixtures("live_vmms")
async def test_what_cannot_be_reattached_is_left_to_the_reclaim(rig: HostRig) -> None:
    await _left_running(rig, VM)
    await _left_running(rig, OTHER)
    no_record = "mvm-aaaaaaaaaaaaaaaaaaaa"
    rig.workdir(no_record).mkdir(parents=True)
    await rig.network.create(no_record, egress=False)
    no_network = "mvm-bbbbbbbbbbbbbbbbbbbb"
    rig.workdir(no_network).mkdir(parents=True)
    _record_process(rig.workdir(no_network), 5, 512)
    rig.vmm.fail.add("attach")
    assert await rig.host.reattach([VM, no_record, no_network]) == []
    rig.vmm.fail.clear()
    rig.agents.fail = True  # attached, but its agent does not answer: killed
    assert await rig.host.reattach([OTHER]) == []
    assert rig.vmm.processes[-1].calls == ["kill"]
    assert [c[0] for c in rig.vmm.calls] == ["attach", "attach"]  # VM, then OTHER


async def test_a_vm_this_host_already_holds_is_not_reattached(rig: HostRig) -> None:
    await rig.host.launch(LaunchSpec(VM, SNAPSHOT))
    assert await rig.host.reattach([VM]) == []
    assert [c[0] for c in rig.vmm.calls] == ["restore"]


# -- adopt suspended -------------------------------------------------------------------------


async def test_a_committed_snapshot_wins_and_any_vmm_of_the_vm_is_killed(
    rig: HostRig, live_vmms: dict[Path, list[int]]
) -> None:
    workdir = _left_suspended(rig)
    live_vmms[workdir] = [4321]  # a resume cut short would be a second copy
    assert await rig.host.adopt_suspended([VM]) == [VM]
    assert live_vmms == {}
    assert rig.host.is_suspended(VM)
    assert rig.network.calls == [("create", VM)]  # none was recorded: one made, egress off
    assert not rig.network.live[VM].egress


async def test_an_adopted_vm_resumes_on_a_network_made_anew(
    rig: HostRig, live_vmms: dict[Path, list[int]]
) -> None:
    _left_suspended(rig)
    await rig.network.create(VM, egress=True)  # allocated by the dead run
    await rig.host.adopt_suspended([VM])
    await rig.host.resume(VM)
    (_call, cfg, snapshot_dir, consume) = rig.vmm.calls[-1]
    assert (snapshot_dir, consume) == (rig.workdir() / "suspend", True)
    assert cfg.netns == "emb-ns2"  # namespace and rules made again after the restart
    assert rig.network.live[VM].egress  # with the egress it had
    assert rig.host.is_running(VM)


async def test_without_a_snapshot_a_vmm_that_still_runs_is_taken_back(
    rig: HostRig, live_vmms: dict[Path, list[int]]
) -> None:
    workdir = await _left_running(rig, pid=55)  # a suspend cut short before its commit
    live_vmms[workdir] = [55]
    assert await rig.host.adopt_suspended([VM]) == [VM]
    assert rig.host.is_running(VM)


@pytest.mark.usefixtures("live_vmms")
async def test_without_a_snapshot_or_a_vmm_nothing_is_adopted(rig: HostRig) -> None:
    rig.workdir().mkdir(parents=True)
    assert await rig.host.adopt_suspended([VM]) == []
    assert not rig.host.is_suspended(VM)


@pytest.mark.usefixtures("live_vmms")
async def test_an_old_snapshot_renamed_aside_is_put_back_before_it_is_read(rig: HostRig) -> None:
    workdir = rig.workdir()
    (workdir / ".suspend.old").mkdir(parents=True)
    assert await rig.host.adopt_suspended([VM]) == [VM]
    assert (workdir / "suspend").is_dir()


# -- reclaim, records, sizes -----------------------------------------------------------------


async def test_reclaim_keeps_the_folders_of_held_vms(
    rig: HostRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.host.launch(LaunchSpec(VM, SNAPSHOT))
    asked: list[tuple[Path, set[str]]] = []

    async def reclaim(root: Path, keep: set[str]) -> list[str]:
        asked.append((root, keep))
        return []

    monkeypatch.setattr(runtime, "reclaim_vm_dirs", reclaim)
    await rig.host.reclaim_leftovers()
    assert asked == [(rig.vms, {vm_dir_name(VM)})]


@pytest.mark.parametrize(
    "body", [None, "not json", '{"pid": 1}', '{"pid": "x", "memory_mib": 1}', "[]"]
)
def test_a_missing_or_bad_process_record_is_none(tmp_path: Path, body: str | None) -> None:
    if body is not None:
        (tmp_path / "process.json").write_text(body)
    assert _read_process(tmp_path) is None


@pytest.mark.parametrize(
    ("kind", "files", "written"),
    [
        ("shared-memory", {"memory": 1000, "device.state": 10, "disk.qcow2": 5}, 15),
        ("delta", {"memory": 100, "base.memory": 1000, "device.state": 10}, 110),
        ("stream", {"memory": 1000, "device.state": 10}, 1010),
    ],
)
def test_a_snapshot_counts_only_the_bytes_it_wrote(
    kind: Any, files: dict[str, int], written: int
) -> None:
    assert written_bytes(manifest(kind=kind, files=files)) == written

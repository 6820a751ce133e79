"""``LocalHost.memory_in_use_mib``: the guest RAM of the VMs whose VMM runs here, what a fleet
host reports with its heartbeat; a suspended or terminated VM holds none."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.framework.host_vm_fakes import SNAPSHOT, HostRig, manifest

from embervm.host.runtime import LaunchSpec


async def test_running_vms_count_and_suspended_or_ended_ones_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = HostRig(tmp_path, monkeypatch)
    assert rig.host.memory_in_use_mib() == 0
    rig.snapshot_memory = 2048
    await rig.host.launch(LaunchSpec("mvm-aaaaaaaaaaaaaaaaaaaa", SNAPSHOT, egress=False))
    rig.snapshot_memory = 512
    await rig.host.launch(LaunchSpec("mvm-bbbbbbbbbbbbbbbbbbbb", SNAPSHOT, egress=False))
    assert rig.host.memory_in_use_mib() == 2560
    first = rig.vmm.processes[0]
    first.snapshot_manifest = manifest(kind="delta", files={"device.state": 10, "memory": 90})
    await rig.host.suspend("mvm-aaaaaaaaaaaaaaaaaaaa")
    assert rig.host.memory_in_use_mib() == 512
    await rig.host.terminate("mvm-bbbbbbbbbbbbbbbbbbbb")
    assert rig.host.memory_in_use_mib() == 0

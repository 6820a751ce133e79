"""``host/builds.py``: ``LocalMachineProvider`` over a fake VMM, network and agent (overlays
"made" by a stand-in for qemu-img): build VMs on fresh overlays, everything undone when a
start fails, layers frozen by ``commit_layer``, machines shut down and released."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from tests.framework.host_vm_fakes import AgentConnector, FakeNetwork, FakeVmm, manifest

from embervm.errors import GuestError, VmmError
from embervm.guest.artifacts import GuestArtifacts
from embervm.host import builds
from embervm.host._boot import BootInputs
from embervm.host.builds import LocalMachineProvider
from embervm.imagebuild.cache import LayerRef


class Rig:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        base = root / "artifacts" / "base.raw"
        base.parent.mkdir(parents=True)
        base.write_bytes(b"\0" * 4096)
        self.artifacts = GuestArtifacts(root / "vmlinuz", root / "initrd", base, "6.1")
        self.vmm = FakeVmm()
        self.network = FakeNetwork()
        self.agents = AgentConnector()
        self.overlays: list[tuple[Path, Path, str]] = []
        monkeypatch.setattr(builds, "connect_agent", self.agents)
        monkeypatch.setattr(builds, "create_overlay", self.create_overlay)
        self.provider = LocalMachineProvider(
            root,
            boot=BootInputs(self.artifacts),
            network=self.network,  # type: ignore[arg-type]
            vmm=self.vmm,  # type: ignore[arg-type]
        )

    def create_overlay(self, backing: Path, dest: Path, fmt: Literal["raw", "qcow2"]) -> Path:
        self.overlays.append((backing, dest, fmt))
        dest.write_bytes(b"QFI\xfb" + b"\0" * 8188)
        return dest

    def layers(self) -> list[Path]:
        return sorted((self.root / "layers").glob("*.qcow2"))

    def build_vms(self) -> list[Path]:
        vms = self.root / "build-vms"
        return sorted(vms.iterdir()) if vms.exists() else []


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Rig:
    return Rig(tmp_path, monkeypatch)


async def test_the_base_layer_is_the_raw_base_disk(rig: Rig) -> None:
    assert await rig.provider.base_layer("debian12") == LayerRef(str(rig.artifacts.base_disk), 0)
    with pytest.raises(VmmError, match="unknown managed base image 'alpine'"):
        await rig.provider.base_layer("alpine")


async def test_has_layer_looks_for_the_file(rig: Rig) -> None:
    assert await rig.provider.has_layer(LayerRef(str(rig.artifacts.base_disk)))
    assert not await rig.provider.has_layer(LayerRef(str(rig.root / "layers" / "gone.qcow2")))


@pytest.mark.parametrize("on_base", [True, False])
async def test_a_build_vm_boots_on_a_fresh_overlay_of_its_layer(rig: Rig, on_base: bool) -> None:
    parent = rig.artifacts.base_disk if on_base else rig.root / "layers" / "step1.qcow2"
    machine = await rig.provider.start_build_machine(
        LayerRef(str(parent)), egress=True, memory_mib=2048
    )
    ((backing, disk, fmt),) = rig.overlays
    assert (backing, fmt) == (parent, "raw" if on_base else "qcow2")
    assert disk.parent == rig.root / "layers"
    assert machine.disk == disk
    ((call, cfg),) = rig.vmm.calls
    assert call == "boot"
    assert (cfg.disk, cfg.memory_mib, cfg.vcpus) == (disk, 2048, 1)
    assert cfg.netns == rig.network.live[machine.vm_id].netns
    assert rig.network.live[machine.vm_id].egress
    assert machine.workdir.is_dir()
    assert machine.workdir.parent == rig.root / "build-vms"
    assert rig.agents.calls == [(cfg.agent_socket, False)]  # a cold boot
    assert machine.vm_id.startswith("build-")


@pytest.mark.parametrize("failing", ["boot", "agent"])
async def test_a_start_that_fails_leaves_nothing(rig: Rig, failing: str) -> None:
    if failing == "boot":
        rig.vmm.fail.add("boot")
    else:
        rig.agents.fail = True
    with pytest.raises((VmmError, GuestError)):
        await rig.provider.start_app_machine(
            LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
        )
    assert rig.layers() == []
    assert rig.build_vms() == []
    assert rig.network.live == {}
    assert [c for c, _ in rig.network.calls] == ["create", "destroy"]
    if failing == "agent":
        assert rig.vmm.processes[0].calls == ["kill"]


async def test_commit_layer_syncs_and_freezes_the_current_overlay(rig: Rig) -> None:
    machine = await rig.provider.start_build_machine(
        LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
    )
    first = machine.disk
    layer = await machine.commit_layer()
    assert layer == LayerRef(str(first), first.stat().st_blocks * 512)
    assert rig.agents.agents[0].calls == ["exec sync"]
    process = rig.vmm.processes[0]
    assert process.calls == [f"switch {machine.disk}"]
    assert machine.disk != first
    assert machine.disk.parent == rig.root / "layers"


async def test_a_failed_sync_freezes_nothing(rig: Rig) -> None:
    machine = await rig.provider.start_build_machine(
        LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
    )
    rig.agents.agents[0].exit_codes = [1]
    disk = machine.disk
    with pytest.raises(GuestError, match="sync failed in the build VM"):
        await machine.commit_layer()
    assert machine.disk == disk
    assert rig.vmm.processes[0].calls == []


async def test_shutdown_kills_releases_and_removes_the_unfrozen_overlay_once(rig: Rig) -> None:
    machine = await rig.provider.start_build_machine(
        LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
    )
    frozen = Path((await machine.commit_layer()).id)
    await machine.shutdown()
    await machine.shutdown()
    assert rig.vmm.processes[0].calls.count("kill") == 1
    assert rig.agents.agents[0].closed
    assert rig.layers() == [frozen]  # the frozen layer stays, the top overlay went
    assert rig.build_vms() == []
    assert rig.network.live == {}


async def test_a_snapshot_reports_the_sizes_of_memory_and_disk(rig: Rig, tmp_path: Path) -> None:
    machine = await rig.provider.start_app_machine(
        LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
    )
    dest = tmp_path / "snapshot"
    dest.mkdir()
    (dest / "memory").write_bytes(b"m" * 8192)
    (dest / "disk.qcow2").write_bytes(b"d" * 4096)
    process = rig.vmm.processes[0]
    process.snapshot_manifest = manifest(files={"memory": 8192, "device.state": 10})
    sizes = await machine.snapshot(dest)
    assert sizes.memory_bytes == (dest / "memory").stat().st_blocks * 512 > 0
    assert sizes.disk_bytes == (dest / "disk.qcow2").stat().st_blocks * 512 > 0
    agent = rig.agents.agents[0]
    assert agent.calls == ["quiesce", "close"]  # the disk settled before the snapshot
    assert process.calls == [f"snapshot {dest}"]


async def test_a_snapshot_without_a_memory_file_counts_none(rig: Rig, tmp_path: Path) -> None:
    machine = await rig.provider.start_app_machine(
        LayerRef(str(rig.artifacts.base_disk)), egress=False, memory_mib=512
    )
    rig.vmm.processes[0].snapshot_manifest = manifest(files={"device.state": 10})
    sizes = await machine.snapshot(tmp_path)
    assert (sizes.memory_bytes, sizes.disk_bytes) == (0, 0)


async def test_a_validate_clone_is_restored_from_the_snapshot(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embervm.vmm

    monkeypatch.setattr(embervm.vmm, "load_manifest", lambda _dir: manifest(1024))
    machine = await rig.provider.restore_app_machine(tmp_path / "snap", egress=False)
    ((call, cfg, snapshot_dir, consume),) = rig.vmm.calls
    assert (call, snapshot_dir, consume, cfg.memory_mib) == (
        "restore",
        tmp_path / "snap",
        False,
        1024,
    )
    assert rig.agents.calls == [(cfg.agent_socket, True)]
    assert machine.vm_id.startswith("validate-")
    await machine.shutdown()  # its disk is in its own folder, which goes
    assert rig.build_vms() == []


async def test_leftovers_of_a_dead_run_are_every_build_vm(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[Path, set[str]]] = []

    async def reclaim(root: Path, keep: set[str]) -> list[str]:
        asked.append((root, keep))
        return ["x"]

    monkeypatch.setattr(builds, "reclaim_vm_dirs", reclaim)
    assert await rig.provider.reclaim_leftovers() == ["x"]
    assert asked == [(rig.root / "build-vms", set())]


async def test_release_keeps_a_disk_outside_the_layers_folder(rig: Rig, tmp_path: Path) -> None:
    outside = tmp_path / "keep.qcow2"
    outside.write_bytes(b"x")
    workdir = tmp_path / "wd"
    workdir.mkdir()
    await rig.provider.release("vm", workdir, outside)
    assert outside.exists()
    assert not workdir.exists()

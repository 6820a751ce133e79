"""What a host registers with and what a snapshot needs of a host: QEMU major.minor, the
accelerator, and the CPU model only under KVM."""

from __future__ import annotations

from pathlib import Path

from embervm.host.capabilities import host_capabilities, host_cpu_model, snapshot_requirements
from embervm.vmm.snapshot import SnapshotManifest


def manifest(accel: str) -> SnapshotManifest:
    return SnapshotManifest(
        kind="delta", vm_id="vm", memory_mib=2048, vcpus=1, accel=accel,
        qemu_version="7.2.15", kernel_release="6.1.0-x", kernel="k", initrd="i", cmdline="c",
        files={},
    )  # fmt: skip


def test_the_cpu_model_is_the_first_model_name(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD  EPYC 7B13\nprocessor\t: 1\nmodel name\t: x\n"
    )
    assert host_cpu_model(info) == "AMD EPYC 7B13"
    assert host_cpu_model(tmp_path / "missing") == "unknown"
    info.write_text("processor\t: 0\n")
    assert host_cpu_model(info) == "unknown"


def test_a_host_offers_what_a_snapshot_needs_and_the_cpu_counts_only_under_kvm() -> None:
    host = host_capabilities(qemu_version="7.2.15", accel="kvm", cpu_model="EPYC")
    assert host == {"qemu": "7.2", "accelerator": "kvm", "cpu": "EPYC"}
    assert snapshot_requirements(manifest("kvm"), cpu_model="EPYC") == {
        "qemu": "7.2",
        "accelerator": "kvm",
        "cpu": "EPYC",
    }
    assert snapshot_requirements(manifest("tcg"), cpu_model="EPYC") == {
        "qemu": "7.2",
        "accelerator": "tcg",
    }

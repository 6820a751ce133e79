"""What a host can restore, and what a snapshot needs: the keys of a fleet's placement
(``store.Placement.required`` against ``HostRecord.capabilities``, docs/FLEET.md).

A snapshot loads only into the QEMU major.minor that took it and the same accelerator
(``vmm.snapshot.check_compatible``). Under KVM the guest saw the host CPU's features
(``-cpu max``), so the CPU model must match too; under TCG the CPU is QEMU's own, whatever the
host's.
"""

from __future__ import annotations

from pathlib import Path

from embervm.vmm.snapshot import SnapshotManifest

CPUINFO = Path("/proc/cpuinfo")


def host_cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` ("unknown" when there is none)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return " ".join(value.split())[:200] or "unknown"
    return "unknown"


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def host_capabilities(*, qemu_version: str, accel: str, cpu_model: str) -> dict[str, str]:
    """What this host registers with."""
    return {"qemu": _major_minor(qemu_version), "accelerator": accel, "cpu": cpu_model}


def snapshot_requirements(manifest: SnapshotManifest, *, cpu_model: str) -> dict[str, str]:
    """What a host must have to restore the snapshot (``cpu_model``: the host it was taken
    on, which only matters under KVM)."""
    needs = {"qemu": _major_minor(manifest.qemu_version), "accelerator": manifest.accel}
    if manifest.accel == "kvm":
        needs["cpu"] = cpu_model
    return needs

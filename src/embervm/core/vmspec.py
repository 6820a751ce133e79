"""``vm_spec``: what a host needs to launch a VM, from its record and its image version."""

from __future__ import annotations

from pathlib import Path

from embervm.contracts import VmSpec
from embervm.core.ids import connector_name
from embervm.errors import InternalError
from embervm.store import MicrovmRecord, VersionRecord


def vm_spec(vm: MicrovmRecord, version: VersionRecord) -> VmSpec:
    if not version.snapshot_dir:
        raise InternalError(f"version {version.version} has no snapshot")
    egress_names = {connector_name(c) for c in vm.egress}
    return VmSpec(
        microvm_id=vm.microvm_id,
        snapshot_dir=Path(version.snapshot_dir),
        egress="INTERNET_EGRESS" in egress_names,
        hooks=vm.hooks,
        run_hook_payload=vm.run_hook_payload,
    )

"""The VMM layer: start, snapshot, restore and supervise microVM processes.

- ``config``: ``VmConfig`` (what a VM is), ``VmStats``.
- ``api``: the ``Vmm`` and ``VmProcess`` Protocols that ``host/`` programs against.
- ``qemu`` / ``process``: the QEMU ``microvm`` implementation (``QemuVmm``, ``QemuProcess``),
  driven over QMP (``qmp``) with a command line built by ``cmdline``.
- ``snapshot``: snapshot directory layout, manifest, atomic writes (see docs/SNAPSHOTS.md).
- ``accel``: KVM-or-TCG detection by a bounded probe; ``jail``: cgroups v1/v2;
  ``disks``: qcow2 overlays.
"""

from embervm.vmm.accel import detect_accelerator
from embervm.vmm.api import Vmm, VmProcess
from embervm.vmm.config import CgroupLimits, VmConfig, VmStats
from embervm.vmm.disks import create_overlay
from embervm.vmm.jail import Cgroup, CgroupDriver, CgroupV1, CgroupV2, detect_cgroup_driver
from embervm.vmm.process import QemuProcess, VmExit
from embervm.vmm.qemu import QemuVmm
from embervm.vmm.snapshot import SnapshotManifest, load_manifest

__all__ = [
    "Cgroup",
    "CgroupDriver",
    "CgroupLimits",
    "CgroupV1",
    "CgroupV2",
    "QemuProcess",
    "QemuVmm",
    "SnapshotManifest",
    "VmConfig",
    "VmExit",
    "VmProcess",
    "VmStats",
    "Vmm",
    "create_overlay",
    "detect_accelerator",
    "detect_cgroup_driver",
    "load_manifest",
]

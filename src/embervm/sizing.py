"""How big a VM is from its memory: the one home of Lambda MicroVMs' sizing rule.

One vCPU per 2 GiB of memory (docs/ARCHITECTURE.md, "Sizes and metering"): a 2 GiB VM is
entitled to one CPU, a 512 MiB VM to a quarter of one. QEMU has no fractional vCPU, so the VMM
gets whole vCPUs (at least one) and its cgroup quota carries the fraction; usage is metered in
the entitled share.
"""

from __future__ import annotations

#: Memory per vCPU of entitlement.
MIB_PER_VCPU = 2048
#: The smallest CPU quota a VMM gets, in cores (the 512 MiB class's share).
MIN_CPU_QUOTA_CORES = 0.25


def cpu_share(memory_mib: int) -> float:
    """The share of a CPU a VM of ``memory_mib`` is entitled to (¼ at 512 MiB, 1 at 2 GiB):
    what it is metered in."""
    return memory_mib / MIB_PER_VCPU


def vcpus_for(memory_mib: int) -> int:
    """Whole vCPUs for the VMM: the share rounded down, at least one."""
    return max(1, memory_mib // MIB_PER_VCPU)


def cpu_quota_for(memory_mib: int) -> float:
    """The VMM's cgroup CPU quota in cores: the share, at least a quarter of a core."""
    return max(MIN_CPU_QUOTA_CORES, cpu_share(memory_mib))

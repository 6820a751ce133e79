"""Shared pieces of starting a microVM on this host: config, network, agent connection."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from embervm.guest import GuestAgent
from embervm.guest.artifacts import GuestArtifacts, host_tsc_khz, kernel_cmdline
from embervm.guest.client import AgentClient
from embervm.network import GATEWAY_IP, GUEST_IP, GUEST_PREFIX, VmNetwork
from embervm.sizing import cpu_quota_for, vcpus_for
from embervm.vmm import CgroupLimits, VmConfig
from embervm.vmm.config import Accel

#: How long a cold-booted guest may take to answer (TCG boots take ~4 s; loaded hosts more).
BOOT_AGENT_TIMEOUT = 90.0
#: How long a restored guest may take to answer (~0.2 s here).
RESTORE_AGENT_TIMEOUT = 30.0


def vm_dir_name(vm_id: str) -> str:
    """A short directory name for a VM: unix socket paths must stay under 108 bytes."""
    return hashlib.blake2b(vm_id.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class BootInputs:
    """What every VM on this host boots from."""

    artifacts: GuestArtifacts
    accel: Accel = "tcg"

    def cmdline(self) -> str:
        return self._cmdline(host_tsc_khz())

    def _cmdline(self, tsc_khz: int | None) -> str:
        return kernel_cmdline(
            guest_ip=GUEST_IP, gateway=GATEWAY_IP, prefix=GUEST_PREFIX, tsc_khz=tsc_khz
        )

    def config(
        self,
        vm_id: str,
        workdir: Path,
        *,
        memory_mib: int,
        network: VmNetwork | None,
        jail: bool = True,
    ) -> VmConfig:
        """The VM's config; ``jail``: a cgroup with limits and a QEMU that drops to a uid of
        its own in a chroot of ``workdir`` (docs/JAIL.md).

        The kernel learns the TSC rate from the line (``tsc_early_khz``), which is what lets the
        VMM turn the PIT and PIC off; where the host's rate cannot be read, the line goes
        without it and the VM keeps the legacy timers (docs/GUEST_PROTOCOL.md, the boot hang).
        """
        tsc_khz = host_tsc_khz()
        return VmConfig.for_workdir(
            vm_id,
            workdir,
            memory_mib=memory_mib,
            vcpus=vcpus_for(memory_mib),
            kernel=self.artifacts.kernel,
            initrd=self.artifacts.initrd,
            cmdline=self._cmdline(tsc_khz),
            legacy_timers=tsc_khz is None,
            kernel_release=self.artifacts.kernel_release,
            accel=self.accel,
            netns=network.netns if network else None,
            tap=network.tap if network else None,
            cgroup=CgroupLimits(cpu_quota_cores=cpu_quota_for(memory_mib)) if jail else None,
            unprivileged=jail,
        )


async def connect_agent(cfg: VmConfig, *, restored: bool) -> GuestAgent:
    timeout = RESTORE_AGENT_TIMEOUT if restored else BOOT_AGENT_TIMEOUT
    return await AgentClient.connect(cfg.agent_socket, timeout=timeout, after_restore=restored)

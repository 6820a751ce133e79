"""``host/_boot.py``: VM directory names, the config every VM of this host boots with, and
which agent timeout a boot or a restore gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.guest.artifacts import GuestArtifacts
from embervm.guest.client import AgentClient
from embervm.host import _boot
from embervm.host._boot import BootInputs, connect_agent, vm_dir_name
from embervm.network import GATEWAY_IP, GUEST_IP, GUEST_PREFIX, VmNetwork
from embervm.vmm import VmConfig

ARTIFACTS = GuestArtifacts(Path("/a/vmlinuz"), Path("/a/initrd"), Path("/a/base.raw"), "6.1.0-x")
NET = VmNetwork("vm", "emb-ns1", "emb-tap1", "emb-h1", "10.213.0.1", "10.213.0.2", True)


def test_vm_dir_names_are_short_stable_and_distinct() -> None:
    name = vm_dir_name("mvm-0123456789abcdef0123")
    assert name == vm_dir_name("mvm-0123456789abcdef0123")
    assert len(name) == 16
    assert int(name, 16) >= 0  # hex
    assert name != vm_dir_name("mvm-0123456789abcdef0124")
    # A unix socket path must stay under 108 bytes even below a long data dir.
    assert len(f"/var/lib/embervm-data-dir-of-some-length/vms/{name}/agent.sock") < 108


def test_the_command_line_names_the_guest_network_and_the_tsc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_boot, "host_tsc_khz", lambda: 2_000_000)
    cmdline = BootInputs(ARTIFACTS).cmdline()
    assert f"vmip={GUEST_IP}/{GUEST_PREFIX}" in cmdline.split()
    assert f"vmgw={GATEWAY_IP}" in cmdline.split()
    assert "tsc_early_khz=2000000" in cmdline.split()


def test_a_jailed_config_has_limits_an_own_uid_and_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_boot, "host_tsc_khz", lambda: None)
    cfg = BootInputs(ARTIFACTS, "kvm").config("vm-1", tmp_path, memory_mib=4096, network=NET)
    assert isinstance(cfg, VmConfig)
    assert (cfg.vm_id, cfg.workdir, cfg.memory_mib, cfg.vcpus) == ("vm-1", tmp_path, 4096, 2)
    assert (cfg.kernel, cfg.initrd, cfg.kernel_release) == (
        ARTIFACTS.kernel,
        ARTIFACTS.initrd,
        "6.1.0-x",
    )
    assert (cfg.accel, cfg.netns, cfg.tap) == ("kvm", "emb-ns1", "emb-tap1")
    assert cfg.unprivileged
    assert cfg.cgroup is not None
    assert cfg.cgroup.cpu_quota_cores == 2.0
    assert cfg.agent_socket == tmp_path / "agent.sock"


def test_an_unjailed_config_without_network(tmp_path: Path) -> None:
    cfg = BootInputs(ARTIFACTS).config("vm", tmp_path, memory_mib=512, network=None, jail=False)
    assert (cfg.netns, cfg.tap, cfg.cgroup, cfg.unprivileged) == (None, None, None, False)
    assert (cfg.vcpus, cfg.accel) == (1, "tcg")


@pytest.mark.parametrize(("restored", "seconds"), [(True, 30.0), (False, 90.0)])
async def test_a_restored_guest_gets_less_time_to_answer_than_a_booting_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: bool, seconds: float
) -> None:
    asked: list[tuple[Path, float, bool]] = []

    async def connect(path: Path, *, timeout: float, after_restore: bool) -> str:  # noqa: ASYNC109
        asked.append((path, timeout, after_restore))
        return "agent"

    monkeypatch.setattr(AgentClient, "connect", connect)
    cfg = BootInputs(ARTIFACTS).config("vm", tmp_path, memory_mib=512, network=None)
    assert await connect_agent(cfg, restored=restored) == "agent"
    assert asked == [(tmp_path / "agent.sock", seconds, restored)]

from pathlib import Path

from embervm.vmm.cmdline import MemorySpec, qemu_argv
from embervm.vmm.config import VmConfig


def cfg(**kw: object) -> VmConfig:
    return VmConfig.for_workdir(
        "vm1", Path("/d"), memory_mib=256, vcpus=2, kernel=Path("/k"), initrd=Path("/i"),
        cmdline="console=ttyS0 tsc_early_khz=1", **kw,
    )  # fmt: skip


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_runs_without_pit_and_pic_and_ram_in_a_shared_file() -> None:
    argv = qemu_argv(cfg())
    assert opt(argv, "-M") == ["microvm,pit=off,pic=off,memory-backend=ram0"]
    assert opt(argv, "-object") == [
        "memory-backend-file,id=ram0,size=256M,mem-path=/d/memory,share=on"
    ]
    assert opt(argv, "-accel") == ["tcg,thread=multi"]  # auto: 2 vCPUs
    assert opt(argv, "-smp") == ["2"]
    assert {"-nodefaults", "-no-user-config", "-nographic"} <= set(argv)
    assert "-incoming" not in argv


def test_legacy_timers_keep_the_microvm_defaults() -> None:
    assert opt(qemu_argv(cfg(legacy_timers=True)), "-M") == ["microvm,memory-backend=ram0"]


def test_agent_port_is_a_qemu_side_server_socket_with_the_agreed_name() -> None:
    argv = qemu_argv(cfg())
    assert "socket,id=agent,path=/d/agent.sock,server=on,wait=off" in opt(argv, "-chardev")
    assert "virtserialport,chardev=agent,name=org.embervm.agent" in opt(argv, "-device")
    assert opt(argv, "-qmp") == ["unix:/d/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-serial") == ["file:/d/console.log"]


def test_tap_is_used_when_given_else_an_isolated_user_backend_keeps_devices_identical() -> None:
    with_tap = qemu_argv(cfg(tap="tap0", netns="ns1"))
    assert opt(with_tap, "-netdev") == ["tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off"]
    without = qemu_argv(cfg())
    assert opt(without, "-netdev") == ["hubport,id=n0,hubid=0"]
    assert opt(with_tap, "-device") == opt(without, "-device")
    assert "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56" in opt(without, "-device")


def test_restore_maps_memory_copy_on_write_and_waits_for_incoming() -> None:
    argv = qemu_argv(cfg(), memory=MemorySpec(Path("/img/memory"), share=False), incoming=True)
    assert opt(argv, "-object") == [
        "memory-backend-file,id=ram0,size=256M,mem-path=/img/memory,share=off"
    ]
    assert opt(argv, "-incoming") == ["defer"]


def test_anonymous_memory_when_no_path() -> None:
    argv = qemu_argv(cfg(), memory=MemorySpec(None, share=False))
    assert opt(argv, "-object") == ["memory-backend-ram,id=ram0,size=256M"]


def test_sandbox_denies_spawn_and_privileges_unless_disabled() -> None:
    assert opt(qemu_argv(cfg()), "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert "-sandbox" not in qemu_argv(cfg(sandbox=False))


def test_kvm_accel_and_multi_threaded_tcg() -> None:
    assert opt(qemu_argv(cfg(accel="kvm")), "-accel") == ["kvm"]
    assert opt(qemu_argv(cfg(tcg_thread="single")), "-accel") == ["tcg,thread=single"]
    one_vcpu = cfg().with_changes(vcpus=1)
    assert opt(qemu_argv(one_vcpu), "-accel") == ["tcg,thread=single"]


def test_default_limits_are_a_core_per_vcpu_and_ram_plus_overhead() -> None:
    lim = cfg().effective_limits()
    assert lim.cpu_quota_cores == 2.0
    assert lim.memory_max_mib is not None
    assert lim.memory_max_mib > 256

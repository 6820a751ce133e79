from pathlib import Path

from embervm.vmm.cmdline import MemorySpec, PrivilegeDrop, drop_flags_from_help, qemu_argv
from embervm.vmm.config import (
    DEFAULT_IO_BYTES_PER_SECOND,
    DEFAULT_IO_OPS_PER_SECOND,
    DEFAULT_PIDS_MAX,
    VmConfig,
)


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
    assert lim.pids_max == DEFAULT_PIDS_MAX
    assert lim.io_bytes_per_second == DEFAULT_IO_BYTES_PER_SECOND
    assert lim.io_ops_per_second == DEFAULT_IO_OPS_PER_SECOND


def test_the_console_goes_to_an_inherited_pipe_as_an_fd_set_when_given_one() -> None:
    argv = qemu_argv(cfg(), serial_fd=7)
    assert opt(argv, "-serial") == ["chardev:console"]  # no /proc in a jailed QEMU's view
    assert opt(argv, "-chardev")[0] == "file,id=console,path=/dev/fdset/2,append=on"
    assert "fd=7,set=2" in opt(argv, "-add-fd")


QEMU_72_HELP = """\
-chroot dir     chroot to dir just before starting the VM
-runas user     change to user id user just before starting the VM
                user can be numeric uid:gid instead
"""
QEMU_81_HELP = """\
-run-with [async-teardown=on|off][,chroot=dir]
                Set miscellaneous QEMU process lifecycle options:
-runas user     change to user id user just before starting the VM
"""
QEMU_91_HELP = """\
-run-with [async-teardown=on|off][,chroot=dir][user=username|uid:gid]
                Set miscellaneous QEMU process lifecycle options:
                user=username switch to the specified user before starting the VM
"""


def test_the_privilege_drop_is_spelled_as_each_qemu_version_takes_it() -> None:
    assert drop_flags_from_help(QEMU_72_HELP) == "runas-chroot"
    assert drop_flags_from_help(QEMU_81_HELP) == "runas-run-with-chroot"
    assert drop_flags_from_help(QEMU_91_HELP) == "run-with"
    jail = Path("/vms/ab")
    assert PrivilegeDrop(7, jail, "runas-chroot").argv() == ["-runas", "7:7", "-chroot", "/vms/ab"]
    assert PrivilegeDrop(7, jail, "runas-run-with-chroot").argv() == [
        "-runas", "7:7", "-run-with", "chroot=/vms/ab"
    ]  # fmt: skip
    assert PrivilegeDrop(7, jail, "run-with").argv() == ["-run-with", "user=7:7,chroot=/vms/ab"]


def test_a_dropping_qemu_keeps_its_sandbox_but_may_call_its_own_setuid() -> None:
    argv = qemu_argv(cfg(), drop=PrivilegeDrop(1879048200, Path("/d")))
    # elevateprivileges=deny would kill QEMU at its own setgid (it loads the filter first).
    assert opt(argv, "-sandbox") == ["on,obsolete=deny,spawn=deny,resourcecontrol=deny"]
    assert opt(argv, "-runas") == ["1879048200:1879048200"]
    assert opt(argv, "-chroot") == ["/d"]


def test_the_disk_is_opened_from_inherited_descriptors_when_given() -> None:
    argv = qemu_argv(cfg(), disk_fds=(8, 9))
    assert opt(argv, "-add-fd") == ["fd=8,set=1", "fd=9,set=1"]
    assert opt(argv, "-drive")[0].startswith("id=d0,file=/dev/fdset/1,format=qcow2,")
    assert opt(argv, "-drive")[0].endswith(",auto-read-only=off,file.locking=off")

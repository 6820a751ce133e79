import os
import subprocess
from pathlib import Path

import pytest

from embervm.errors import JailError
from embervm.vmm.config import CgroupLimits
from embervm.vmm.jail import (
    UID_BASE,
    UID_SPAN,
    CgroupV1,
    CgroupV2,
    block_device_of,
    claimed_uid,
    detect_cgroup_driver,
    uids_in_use,
)

LIMITS = CgroupLimits(cpu_quota_cores=1.5, memory_max_mib=512)
IO_LIMITS = CgroupLimits(
    cpu_quota_cores=1, pids_max=256, io_bytes_per_second=1 << 20, io_ops_per_second=500
)


def fake_v2(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_writes_cpu_max_and_memory_max_and_enables_controllers(tmp_path: Path) -> None:
    root = fake_v2(tmp_path / "cg")
    cg = CgroupV2(root).create("vm-a", LIMITS)
    d = root / "embervm" / "vm-a"
    assert cg.dirs == (d,)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "memory.max").read_text() == str(512 << 20)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"
    assert (root / "embervm" / "cgroup.subtree_control").read_text() == "+cpu +io +memory +pids"


def test_v1_writes_cfs_quota_and_memory_limit_in_two_hierarchies(tmp_path: Path) -> None:
    cpu, mem = tmp_path / "cpu", tmp_path / "memory"
    cpu.mkdir(), mem.mkdir()
    cg = CgroupV1(cpu, mem).create("vm-a", LIMITS)
    assert cg.dirs == (cpu / "embervm" / "vm-a", mem / "embervm" / "vm-a")
    assert (cpu / "embervm/vm-a/cpu.cfs_quota_us").read_text() == "150000"
    assert (cpu / "embervm/vm-a/cpu.cfs_period_us").read_text() == "100000"
    assert (mem / "embervm/vm-a/memory.limit_in_bytes").read_text() == str(512 << 20)
    assert CgroupV1(cpu, mem).existing("vm-a") == cg
    cg.destroy()
    assert CgroupV1(cpu, mem).existing("vm-a") is None


def test_detect_prefers_v2_root(tmp_path: Path) -> None:
    root = fake_v2(tmp_path / "cg")
    assert detect_cgroup_driver(root=root, mounts=tmp_path / "none").version == 2


def test_detect_falls_back_to_v1_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /x/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup /x/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup2 /x/unified cgroup2 rw 0 0\n"
    )
    driver = detect_cgroup_driver(root=tmp_path / "nov2", mounts=mounts)
    assert isinstance(driver, CgroupV1)
    assert (driver.cpu_root, driver.memory_root) == (Path("/x/cpu"), Path("/x/memory"))


def test_detect_without_any_usable_hierarchy_says_so(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /x/pids cgroup rw,pids 0 0\n")
    with pytest.raises(JailError, match="no cgroup"):
        detect_cgroup_driver(root=tmp_path / "nov2", mounts=mounts)


def test_launch_prefix_joins_every_cgroup_before_exec_with_the_same_pid(tmp_path: Path) -> None:
    cpu, mem = tmp_path / "cpu", tmp_path / "memory"
    cpu.mkdir(), mem.mkdir()
    cg = CgroupV1(cpu, mem).create("vm-a", LIMITS)
    out = subprocess.run(
        [*cg.launch_prefix(), "/bin/sh", "-c", "echo $$"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    pid = out.stdout.strip()
    assert (cpu / "embervm/vm-a/cgroup.procs").read_text().strip() == pid
    assert (mem / "embervm/vm-a/cgroup.procs").read_text().strip() == pid


def test_launch_prefix_refuses_to_run_outside_the_cgroup(tmp_path: Path) -> None:
    cpu, mem = tmp_path / "cpu", tmp_path / "memory"
    cpu.mkdir(), mem.mkdir()
    cg = CgroupV1(cpu, mem).create("vm-a", LIMITS)
    (mem / "embervm/vm-a").chmod(0o500)
    (mem / "embervm/vm-a/cgroup.procs").mkdir()  # unwritable: joining fails
    marker = tmp_path / "ran"
    proc = subprocess.run([*cg.launch_prefix(), "touch", str(marker)], timeout=10, check=False)
    assert proc.returncode == 126
    assert not marker.exists()


def test_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(JailError):
        CgroupV2(fake_v2(tmp_path / "cg")).create("../escape", LIMITS)


def test_v2_caps_tasks_and_disk_io_on_the_given_device(tmp_path: Path) -> None:
    root = fake_v2(tmp_path / "cg")
    CgroupV2(root).create("vm-a", IO_LIMITS, io_device=(254, 0))
    d = root / "embervm" / "vm-a"
    assert (d / "pids.max").read_text() == "256"
    assert (d / "io.max").read_text() == ("254:0 rbps=1048576 wbps=1048576 riops=500 wiops=500")


def test_v2_without_the_io_controller_still_caps_tasks(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    CgroupV2(root).create("vm-a", IO_LIMITS, io_device=(254, 0))
    d = root / "embervm" / "vm-a"
    assert (d / "pids.max").read_text() == "256"
    assert not (d / "io.max").exists()
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"


def test_v1_caps_tasks_and_throttles_blkio_each_way(tmp_path: Path) -> None:
    roots = [tmp_path / c for c in ("cpu", "memory", "pids", "blkio")]
    for r in roots:
        r.mkdir()
    cpu, mem, pids, blkio = roots
    driver = CgroupV1(cpu, mem, pids_root=pids, blkio_root=blkio)
    cg = driver.create("vm-a", IO_LIMITS, io_device=(8, 0))
    assert cg.dirs == tuple(r / "embervm" / "vm-a" for r in roots)
    assert (pids / "embervm/vm-a/pids.max").read_text() == "256"
    b = blkio / "embervm/vm-a"
    assert (b / "blkio.throttle.read_bps_device").read_text() == "8:0 1048576"
    assert (b / "blkio.throttle.write_bps_device").read_text() == "8:0 1048576"
    assert (b / "blkio.throttle.read_iops_device").read_text() == "8:0 500"
    assert (b / "blkio.throttle.write_iops_device").read_text() == "8:0 500"
    assert driver.existing("vm-a") == cg


def test_detect_v1_finds_the_pids_and_blkio_hierarchies(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /x/cpu cgroup rw,relatime,cpu 0 0\n"
        "cgroup /x/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup /x/pids cgroup rw,relatime,pids 0 0\n"
        "cgroup /x/blkio cgroup rw,relatime,blkio 0 0\n"
    )
    driver = detect_cgroup_driver(root=tmp_path / "nov2", mounts=mounts)
    assert isinstance(driver, CgroupV1)
    assert (driver.pids_root, driver.blkio_root) == (Path("/x/pids"), Path("/x/blkio"))


def test_io_limits_are_keyed_by_the_whole_disk_not_its_partition(tmp_path: Path) -> None:
    f = tmp_path / "disk.qcow2"
    f.write_bytes(b"")
    dev = f.stat().st_dev
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "sda"
    part = disk / "sda1"
    part.mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (part / "partition").write_text("1\n")
    (sysfs / "block").mkdir()
    (sysfs / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(part)
    assert block_device_of(f, sysfs / "block") == (8, 0)
    (part / "partition").unlink()
    assert block_device_of(f, sysfs / "block") == (os.major(dev), os.minor(dev))
    assert block_device_of(f, tmp_path / "nothing") is None


def test_each_spawn_in_flight_gets_its_own_uid_and_live_ones_are_skipped() -> None:
    with claimed_uid("vm-a", set()) as first:
        seed_uid = first
        assert UID_BASE <= first < UID_BASE + UID_SPAN
        with claimed_uid("vm-a", set()) as second:  # same seed, still in flight
            assert second != first
    with claimed_uid("vm-a", set()) as again:  # released: the same VM gets its uid back
        assert again == seed_uid
    with claimed_uid("vm-a", {seed_uid}) as taken:  # a live process has it
        assert taken != seed_uid


def test_uids_in_use_reads_every_id_of_every_process(tmp_path: Path) -> None:
    for pid, ids in (("12", "5 6 7 8"), ("13", "9 9 9 9")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "status").write_text(f"Name:\tq\nUid:\t{ids}\nGid:\t100 100 100 100\n")
    (tmp_path / "self").mkdir()
    assert uids_in_use(tmp_path) == {5, 6, 7, 8, 9, 100}
    assert os.getuid() in uids_in_use()

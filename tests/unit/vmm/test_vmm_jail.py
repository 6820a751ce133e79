import subprocess
from pathlib import Path

import pytest

from embervm.errors import JailError
from embervm.vmm.config import CgroupLimits
from embervm.vmm.jail import CgroupV1, CgroupV2, detect_cgroup_driver

LIMITS = CgroupLimits(cpu_quota_cores=1.5, memory_max_mib=512)


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
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (root / "embervm" / "cgroup.subtree_control").read_text() == "+cpu +memory"


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

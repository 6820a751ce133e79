"""The QEMU VMM against real QEMU (TCG) microVMs booted from the project's guest artifacts.

One VM is cold-booted per module and snapshotted (the "image"); the other tests restore clones
of it, which keeps the module to a few VM-seconds. Every VMM a test starts is killed in its
finalizer, and the leak checks look for QEMU processes by their per-test work directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from tests.framework.vmm_qemu_lab import Lab, sh

from embervm.errors import SnapshotError, VmmError
from embervm.guest.artifacts import GuestArtifacts
from embervm.vmm import (
    CgroupLimits,
    QemuVmm,
    create_overlay,
    detect_accelerator,
    detect_cgroup_driver,
    load_manifest,
    ramdelta,
)
from embervm.vmm import snapshot as snap
from embervm.vmm._procfs import pid_alive
from embervm.vmm.cmdline import MemorySpec
from embervm.vmm.qmp import Qmp, migrate_from_file, set_migration_caps
from embervm.vmm.ramdelta import DeltaUnsupported

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="base disk build and cgroups need root"),
    pytest.mark.timeout(180),
]


async def test_cold_boot_reaches_the_agent_and_stops_cleanly(lab: Lab) -> None:
    proc, cfg = await lab.boot()
    assert (await sh(cfg, "cat /proc/cmdline")).count("tsc_early_khz") == 1
    assert await proc.status() == "running"
    stats = await proc.stats()
    assert stats.rss_bytes > 0
    assert stats.pss_bytes > 0
    assert await proc.stop(timeout=10) == 0
    info = await proc.wait_exit()
    assert info.expected
    assert "stopped" in info.reason


async def test_pause_freezes_the_guest_and_cont_resumes_it(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0])
    before = int(await sh(cfg, "cat /run/counter"))
    await proc.pause()
    assert await proc.status() == "paused"
    cpu0 = (await proc.stats()).cpu_seconds
    await asyncio.sleep(1.0)
    assert await proc.status() == "paused"
    await proc.cont()
    assert await proc.status() == "running"
    await asyncio.sleep(0.3)
    assert int(await sh(cfg, "cat /run/counter")) > before
    assert (await proc.stats()).cpu_seconds >= cpu0


async def test_restored_clone_keeps_the_guest_process_and_its_memory(
    lab: Lab, image: tuple[Path, str]
) -> None:
    snapshot_dir, counter_pid = image
    _, cfg = await lab.restore(snapshot_dir)
    # /run is a tmpfs and the counter a shell variable: both exist only in guest RAM.
    out = await sh(cfg, "cat /run/counter.pid; cat /run/counter; kill -0 $(cat /run/counter.pid)")
    pid, count = out.split()
    assert pid == counter_pid
    assert int(count) > 0
    later = int(await sh(cfg, "sleep 0.3; cat /run/counter"))
    assert later > int(count)


async def test_two_clones_of_one_snapshot_have_independent_disks(
    lab: Lab, image: tuple[Path, str]
) -> None:
    _, a = await lab.restore(image[0])
    _, b = await lab.restore(image[0])
    await sh(a, "echo from-a > /root/mark && sync")
    assert (await sh(b, "cat /root/mark 2>/dev/null || echo none")).strip() == "none"
    assert (await sh(a, "cat /root/mark")).strip() == "from-a"
    await sh(b, "echo from-b > /root/mark && sync")
    assert (await sh(a, "cat /root/mark")).strip() == "from-a"


async def test_suspend_and_resume_cycles_keep_processes_and_files(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0])
    await sh(cfg, "echo kept > /root/file && sync")
    kinds = []
    for _ in range(3):
        count = int(await sh(cfg, "cat /run/counter"))
        manifest = await proc.snapshot(cfg.workdir / "suspend")
        kinds.append(manifest.kind)
        assert (await proc.wait_exit()).expected
        proc, cfg = await lab.restore(cfg.workdir / "suspend", cfg, consume=True)
        assert not (cfg.workdir / "suspend").exists()  # a resume consumes the suspend snapshot
        out = await sh(cfg, "cat /root/file; kill -0 $(cat /run/counter.pid); cat /run/counter")
        kept, after = out.split()
        assert kept == "kept"
        assert int(after) >= count
    assert kinds == ["delta"] * 3  # a clone's RAM is private over its image's: what differs


async def test_booted_vm_suspends_by_handing_over_its_ram_file(lab: Lab) -> None:
    proc, cfg = await lab.boot()
    await sh(
        cfg,
        "echo 7 > /run/x",
    )
    manifest = await proc.snapshot(cfg.workdir / "suspend")
    assert manifest.kind == "shared-memory"
    assert manifest.files[snap.DEVICE_STATE].size < 1 << 20  # device state only
    proc, cfg = await lab.restore(cfg.workdir / "suspend", cfg, consume=True)
    assert (await sh(cfg, "cat /run/x")).strip() == "7"


async def test_snapshot_keeping_the_vm_running(lab: Lab, image: tuple[Path, str]) -> None:
    proc, cfg = await lab.restore(image[0])
    await sh(cfg, "echo before > /root/f && sync")
    await proc.snapshot(cfg.workdir / "snap", resume=True)
    assert await proc.status() == "running"
    await sh(cfg, "echo after > /root/f && sync")
    _, clone = await lab.restore(cfg.workdir / "snap")
    assert (await sh(clone, "cat /root/f")).strip() == "before"
    assert (await sh(cfg, "cat /root/f")).strip() == "after"


async def test_sigkill_of_the_vmm_is_detected_with_a_reason(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, _ = await lab.restore(image[0])
    os.kill(proc.pid, signal.SIGKILL)
    info = await asyncio.wait_for(proc.wait_exit(), 30)
    assert not info.expected
    assert info.returncode == -signal.SIGKILL
    assert "signal 9" in info.reason
    with pytest.raises(VmmError, match="signal 9"):
        await proc.pause()


async def test_a_new_vmm_object_attaches_to_a_running_vmm(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0])
    await proc.detach()  # what a server shutdown does; the VM keeps running
    attached = lab.track(await QemuVmm().attach(cfg, proc.pid))
    assert await attached.status() == "running"
    await attached.pause()
    assert await attached.status() == "paused"
    await attached.cont()
    assert int(await sh(cfg, "cat /run/counter")) > 0
    os.kill(proc.pid, signal.SIGKILL)
    info = await asyncio.wait_for(attached.wait_exit(), 30)
    assert not info.expected
    assert "unexpectedly" in info.reason


async def test_attach_refuses_a_pid_that_is_not_this_vms_vmm(lab: Lab) -> None:
    with pytest.raises(VmmError, match="not the VMM"):
        await lab.vmm.attach(lab.cfg(), os.getpid())


async def test_corrupt_snapshot_raises_and_leaves_no_process(
    lab: Lab, image: tuple[Path, str]
) -> None:
    bad = lab.root / "bad"
    os.mkdir(bad)
    for name in (snap.MANIFEST, snap.MEMORY, snap.DISK):
        os.link(image[0] / name, bad / name)
    state = (image[0] / snap.DEVICE_STATE).read_bytes()
    (bad / snap.DEVICE_STATE).write_bytes(state[:100] + bytes([state[100] ^ 1]) + state[101:])
    cfg = lab.cfg()
    with pytest.raises(SnapshotError, match="sha256"):
        await lab.vmm.restore(cfg, bad)
    with pytest.raises(SnapshotError, match="no snapshot"):
        await lab.vmm.restore(cfg, lab.root / "missing")
    (bad / snap.MANIFEST).unlink()
    with pytest.raises(SnapshotError):
        await lab.vmm.restore(cfg, bad)
    assert lab.qemu_pids_under(lab.root) == []
    assert not cfg.disk.exists()


async def test_device_state_qemu_rejects_raises_and_leaves_no_process(
    lab: Lab, image: tuple[Path, str]
) -> None:
    """A snapshot whose manifest is consistent but whose stream QEMU cannot load."""
    bad = lab.root / "bad"
    tmp = snap.temp_dir_for(bad)
    for name in (snap.MEMORY, snap.DISK):
        os.link(image[0] / name, tmp / name)
    (tmp / snap.DEVICE_STATE).write_bytes(b"QEVM garbage" * 10)
    good = load_manifest(image[0])
    files = dict(good.files)
    files[snap.DEVICE_STATE] = snap.FileEntry(120, snap.sha256_file(tmp / snap.DEVICE_STATE))
    snap.commit_snapshot_dir(tmp, bad, replace(good, files=files))
    cfg = lab.cfg()
    with pytest.raises(SnapshotError, match="restore of VM") as err:
        await lab.vmm.restore(cfg, bad)
    assert str(lab.root) not in str(err.value)  # QEMU's words and host paths: the log only
    assert lab.qemu_pids_under(lab.root) == []


async def test_incompatible_snapshot_is_refused_before_starting_qemu(
    lab: Lab, image: tuple[Path, str]
) -> None:
    with pytest.raises(SnapshotError, match="incompatible"):
        await lab.vmm.restore(lab.cfg(memory_mib=512), image[0])


async def test_vmm_runs_in_its_own_cgroup_with_limits(lab: Lab, image: tuple[Path, str]) -> None:
    driver = detect_cgroup_driver()
    lab.vmm = QemuVmm(cgroups=driver)
    cfg = lab.cfg(cgroup=CgroupLimits())
    proc, cfg = await lab.restore(image[0], cfg)
    cg = driver.existing(f"vm-{cfg.vm_id}")
    assert cg is not None
    assert proc.pid in cg.pids()
    assert int(await sh(cfg, "cat /run/counter")) > 0
    await proc.stop()
    assert driver.existing(f"vm-{cfg.vm_id}") is None


@pytest.mark.timeout(60)
async def test_accelerator_probe_answers_tcg_here_and_never_hangs(
    guest_artifacts: GuestArtifacts, tmp_path: Path
) -> None:
    result = await detect_accelerator(
        tmp_path / "accel.json", timeout=5, kernel=guest_artifacts.kernel
    )
    if "fc" in os.uname().release:
        assert result == "tcg"  # the nested paravirtual KVM of the development machines
    assert (tmp_path / "accel.json").exists()
    assert pid_alive(os.getpid())


async def test_cancelled_suspend_leaves_the_vm_running_and_the_old_snapshot(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0], lab.cfg(memory_mib=256))
    dest = cfg.workdir / "suspend"
    await proc.snapshot(dest, resume=True)  # an older snapshot that must survive
    old = load_manifest(dest)
    task = asyncio.create_task(proc.snapshot(dest))
    await asyncio.sleep(0.05)  # mid-migration (a stream snapshot takes ~0.3 s)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await proc.status() == "running"
    assert load_manifest(dest) == old
    assert [p.name for p in cfg.workdir.iterdir() if p.name.startswith(".suspend")] == []
    assert int(await sh(cfg, "cat /run/counter")) > 0


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    mnt = Path(f"/tmp/vmm-full-{os.getpid()}")
    mnt.mkdir()
    rc = os.system(f"mount -t tmpfs -o size=4m tmpfs {mnt}")
    if rc != 0:
        mnt.rmdir()
        pytest.skip("cannot mount a tmpfs")
    try:
        yield mnt
    finally:
        os.system(f"umount {mnt} || umount -l {mnt}")
        mnt.rmdir()


async def test_disk_full_during_snapshot_raises_keeps_old_state_and_cleans_up(
    lab: Lab, image: tuple[Path, str], tiny_fs: Path
) -> None:
    proc, cfg = await lab.restore(image[0])
    dest = tiny_fs / "suspend"
    dest.mkdir()
    (dest / "manifest.json").write_text("old")  # stands for the previous state
    with pytest.raises(SnapshotError, match="snapshot of VM"):
        await proc.snapshot(dest)
    assert (dest / "manifest.json").read_text() == "old"
    assert sorted(os.listdir(tiny_fs)) == ["suspend"]
    assert await proc.status() == "running"
    assert int(await sh(cfg, "cat /run/counter")) > 0


@pytest.fixture
def netns_with_tap() -> Iterator[str]:
    ns = f"vmmtest{os.getpid()}"
    setup = [
        f"ip netns add {ns}",
        f"ip netns exec {ns} ip tuntap add dev tap0 mode tap",
        f"ip netns exec {ns} ip addr add 10.0.2.2/24 dev tap0",
        f"ip netns exec {ns} ip link set tap0 up",
    ]
    try:
        for cmd in setup:
            if os.system(cmd) != 0:
                pytest.skip(f"cannot set up a netns: {cmd}")
        yield ns
    finally:
        os.system(f"ip netns del {ns} 2>/dev/null")


async def test_restored_vm_in_a_netns_talks_over_its_tap(
    lab: Lab, image: tuple[Path, str], netns_with_tap: str
) -> None:
    cfg = lab.cfg(netns=netns_with_tap, tap="tap0")
    _, cfg = await lab.restore(image[0], cfg)
    assert int(await sh(cfg, "cat /run/counter")) > 0
    # 10.0.2.2 exists only on the tap inside the test's netns: an answer proves the wiring.
    out = await sh(cfg, "ping -c 1 -W 5 10.0.2.2")
    assert "1 received" in out


async def test_corrupt_ram_in_a_delta_snapshot_is_caught_before_the_guest_runs(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, _ = await lab.restore(image[0])
    dest = lab.root / "stream"
    manifest = await proc.snapshot(dest)
    assert manifest.kind == "delta"
    state = dest / snap.DEVICE_STATE
    with state.open("r+b") as f:  # a byte in the middle: guest RAM that QEMU loads happily
        f.seek(manifest.files[snap.DEVICE_STATE].size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    cfg2 = lab.cfg()
    with pytest.raises(SnapshotError, match="sha256"):
        await lab.vmm.restore(cfg2, dest)
    assert lab.qemu_pids_under(cfg2.workdir) == []


async def test_a_delta_suspend_restores_guest_ram_exactly_and_writes_little(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0])
    noise = await sh(cfg, "head -c 8M /dev/urandom > /run/noise; md5sum /run/noise")
    await proc.pause()
    before = lab.root / "before.ram"
    await proc.qmp("pmemsave", {"val": 0, "size": cfg.memory_mib << 20, "filename": str(before)})
    suspend = cfg.workdir / "suspend"
    manifest = await proc.snapshot(suspend)
    assert manifest.kind == "delta"
    assert (suspend / snap.BASE_MEMORY).samefile(image[0] / snap.MEMORY)
    # The 8 MiB the guest wrote and little else: a full stream of this guest is ~100 MiB.
    assert 8 << 20 < manifest.files[snap.DEVICE_STATE].size < 40 << 20

    # Loaded over the base file, paused before it runs: the very same RAM, bit for bit.
    probe = lab.cfg()
    create_overlay(suspend / snap.DISK, probe.disk, "qcow2")
    after = lab.root / "after.ram"

    async def load_and_dump(qmp: Qmp) -> None:
        await set_migration_caps(qmp, ignore_shared=False)
        await migrate_from_file(qmp, suspend / snap.DEVICE_STATE, sha256=None, timeout=60)
        await qmp.cmd("pmemsave", {"val": 0, "size": probe.memory_mib << 20,
                                   "filename": str(after)})  # fmt: skip

    over_base = MemorySpec(suspend / snap.BASE_MEMORY, share=False)
    probe_proc = lab.track(
        await lab.vmm._start(probe, over_base, incoming=True, after_start=load_and_dump)
    )
    await probe_proc.kill()  # it holds the suspended disk open
    assert before.read_bytes() == after.read_bytes()

    # And the resume a suspended VM gets: its memory is the base again, plus the delta.
    proc, cfg = await lab.restore(suspend, cfg, consume=True)
    assert (cfg.workdir / snap.BASE_MEMORY).samefile(image[0] / snap.MEMORY)
    assert await sh(cfg, "md5sum /run/noise") == noise


async def test_a_stream_it_cannot_filter_falls_back_to_a_full_stream(
    lab: Lab, image: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise DeltaUnsupported("test")

    monkeypatch.setattr(ramdelta, "filter_stream", refuse)
    proc, cfg = await lab.restore(image[0])
    await sh(cfg, "echo 5 > /run/x")
    manifest = await proc.snapshot(cfg.workdir / "suspend")
    assert manifest.kind == "stream"
    assert snap.BASE_MEMORY not in manifest.files
    assert not (cfg.workdir / "suspend" / snap.BASE_MEMORY).exists()
    proc, cfg = await lab.restore(cfg.workdir / "suspend", cfg, consume=True)
    assert (await sh(cfg, "cat /run/x")).strip() == "5"
    # Its RAM is anonymous now: the next suspend streams it again.
    assert (await proc.snapshot(cfg.workdir / "suspend")).kind == "stream"

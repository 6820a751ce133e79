"""The VMM jail against real QEMU (TCG): a jailed QEMU runs as a uid of its own with no
capability, chrooted into its VM's directory, in a cgroup that caps its tasks, and still
boots, restores, snapshots (through fds it is handed) and suspends; a guest that floods its
serial console leaves a bounded console.log. Fixtures come from ``tests.framework.vmm_qemu_lab``."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from tests.framework.vmm_qemu_lab import Lab, agent, sh

from embervm.errors import VmmError
from embervm.vmm import CgroupLimits, QemuVmm, VmConfig, detect_cgroup_driver, seccomp
from embervm.vmm import snapshot as snap
from embervm.vmm.config import DEFAULT_PIDS_MAX
from embervm.vmm.jail import UID_BASE, UID_SPAN
from embervm.vmm.logcap import cap_bytes
from embervm.vmm.qemu import probe_jail
from embervm.vmm.rootview import backing_chain

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the jail and cgroups need root"),
    pytest.mark.timeout(240),
]


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def assert_jailed(pid: int, workdir: Path) -> int:
    """The QEMU process runs as one unprivileged uid and gid, with no capability, no way to
    gain one, its seccomp filter, and ``workdir`` as its root; returns the uid."""
    st = status(pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    assert len(uids) == 1
    (uid,) = uids
    assert UID_BASE <= uid < UID_BASE + UID_SPAN
    assert gids == {uid}
    assert st["Groups"] == str(uid)
    assert int(st["CapEff"], 16) == 0
    assert int(st["CapPrm"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert st["Seccomp_filters"] == "2"  # QEMU's own and embervm's (vmm/seccomp.py)
    assert os.readlink(f"/proc/{pid}/root") == str(workdir)
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o700  # root's: QEMU cannot even list it
    return uid


def in_its_namespace(pid: int, *argv: str) -> str:
    """``argv``'s output, run in ``pid``'s mount namespace (from that namespace's root)."""
    done = subprocess.run(["nsenter", "-t", str(pid), "-m", "--", *argv],
                          capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    return done.stdout


def assert_own_mount_namespace(pid: int, cfg: VmConfig, snapshot: Path) -> None:
    """Before its chroot QEMU saw a mount namespace of its own (vmm/rootview.py): an empty
    read-only root with the system, a few devices, its own directory and the files it was
    started from (kernel, initrd, the snapshot it restores and that disk's backing chain),
    nothing else of the host: no other VM's files, no /proc, no /root or /var."""
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    found = in_its_namespace(
        pid, "find", "/", "-path", "/usr", "-prune", "-o", "!", "-type", "d", "-print"
    ).split()
    own = {p for p in found if p.startswith(f"{cfg.workdir}/")}
    assert {str(cfg.qmp_socket), str(cfg.agent_socket)} <= own
    system = {"/bin", "/lib", "/lib64", "/sbin", "/etc/ld.so.cache"}
    devices = {f for f in found if f.startswith("/dev/")}
    assert devices <= {f"/dev/{d}" for d in ("null", "zero", "urandom", "random", "net/tun")}
    inputs = {str(cfg.kernel), str(cfg.initrd), *(str(f) for f in snapshot.iterdir())}
    inputs |= {str(f) for f in backing_chain(snapshot / snap.DISK)}
    rest = set(found) - own - system - devices
    assert str(cfg.kernel) in rest
    assert rest <= inputs, rest - inputs
    assert "Read-only" in in_its_namespace(pid, "sh", "-c", "touch /x 2>&1 || true")


async def test_a_jailed_vmm_is_unprivileged_and_chrooted_and_still_snapshots_and_resumes(
    lab: Lab, image: tuple[Path, str]
) -> None:
    driver = detect_cgroup_driver()
    lab.vmm = QemuVmm(cgroups=driver)
    proc, cfg = await lab.restore(image[0], lab.cfg(unprivileged=True, cgroup=CgroupLimits()))
    uid = assert_jailed(proc.pid, cfg.workdir)
    assert_own_mount_namespace(proc.pid, cfg, image[0])
    cgroup = driver.existing(f"vm-{cfg.vm_id}")
    assert cgroup is not None
    pids_max = [d / "pids.max" for d in cgroup.dirs if (d / "pids.max").exists()]
    assert [p.read_text().strip() for p in pids_max] == [str(DEFAULT_PIDS_MAX)]

    # A snapshot that keeps the VM running moves its disk onto a new overlay: made by the
    # host, handed to the chrooted QEMU as an fd set.
    await sh(cfg, "echo before > /root/f && sync")
    await proc.snapshot(cfg.workdir / "snap", resume=True)
    await sh(cfg, "echo after > /root/f && sync")
    assert (await sh(cfg, "cat /root/f")).strip() == "after"

    # A second jailed VM gets another uid; its suspend and resume work through fds too.
    clone, clone_cfg = await lab.restore(cfg.workdir / "snap", lab.cfg(unprivileged=True))
    assert assert_jailed(clone.pid, clone_cfg.workdir) != uid
    assert_own_mount_namespace(clone.pid, clone_cfg, cfg.workdir / "snap")
    assert (await sh(clone_cfg, "cat /root/f")).strip() == "before"
    await clone.snapshot(clone_cfg.workdir / "suspend")
    for name in (snap.DEVICE_STATE, snap.BASE_MEMORY, snap.DISK):  # the VM's RAM and disk
        path = clone_cfg.workdir / "suspend" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    resumed, resumed_cfg = await lab.restore(clone_cfg.workdir / "suspend", clone_cfg, consume=True)
    assert_jailed(resumed.pid, resumed_cfg.workdir)
    assert (await sh(resumed_cfg, "cat /root/f")).strip() == "before"


async def test_a_guest_flooding_its_serial_console_leaves_a_bounded_log(
    lab: Lab, image: tuple[Path, str]
) -> None:
    proc, cfg = await lab.restore(image[0], lab.cfg(unprivileged=True))
    client = await agent(cfg)
    try:
        flood = "head -c 3000000 /dev/zero | tr '\\0' A > /dev/ttyS0"
        result = await client.exec(["/bin/sh", "-c", flood], timeout=180)
    finally:
        await client.close()
    assert result.exit_code == 0, result
    await proc.stop()
    size = cfg.console_log.stat().st_size
    assert size <= cap_bytes()
    assert b"bytes dropped]" in cfg.console_log.read_bytes()
    assert stat.S_IMODE(cfg.console_log.stat().st_mode) == 0o600


def test_the_doctor_s_jail_probe_starts_a_jailed_qemu_and_sees_a_broken_jail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe_jail()  # own mount namespace, the allow-list, the uid drop and chroot: QMP answers
    monkeypatch.delitem(seccomp.ALLOWED_SYSCALLS, "chroot")
    with pytest.raises(VmmError, match="chroot failed"):
        probe_jail()

"""VM-level chaos: suspend/resume soak, a full disk during suspend, damaged snapshot files.

Everything runs through ``LocalHost`` (the host runtime the server drives): real TCG microVMs
in their own network namespaces, launched from one image snapshot that ``open_lab`` builds.
Each VM runs a *probe*: a Python process started through the guest agent that holds a counter
and 4 MiB of random bytes in its memory and answers, on request, its PID, its counter (which
the request increments) and the sha256 of those bytes; plus a 1 MiB random file and a log
file the probe appends to on disk. After every fault the probe is asked again, and each of
those five records must be exactly what it was (or, for the counter and the log, exactly one
step further): the bug to catch is state lost after the 2nd, 3rd, ... resume, not the first.

Needs root (netns, nftables, loop mounts) and QEMU; the guest artifacts come from
``$EMBERVM_TEST_CACHE`` (default ``~/.cache/embervm-test``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embervm.core.ids import state_reason
from embervm.errors import SnapshotError
from embervm.guest.artifacts import GuestArtifacts
from embervm.host import LaunchSpec, LocalHost, LocalMachineProvider
from embervm.host._boot import BootInputs, vm_dir_name
from embervm.network import NetworkManager
from embervm.vmm import QemuProcess, QemuVmm, load_manifest
from embervm.vmm import snapshot as snap

from . import Row, Scenario, StateLost

POOL = f"10.216.{4 * secrets.randbelow(64)}.0/22"  # no other test draws from 10.216.0.0/16
MEMORY_MIB = 256
EXEC_TIMEOUT = 60.0

PROBE = b"""
import hashlib, os
ballast = os.urandom(4 << 20)  # guest RAM that must come back bit for bit
count = 0
while True:
    with open("/run/chaos/ask") as f:
        f.read()
    count += 1
    with open("/run/chaos/answer", "w") as f:
        f.write(f"{os.getpid()} {count} {hashlib.sha256(ballast).hexdigest()}\\n")
"""

START = (
    "set -e; mkdir -p /run/chaos; mkfifo /run/chaos/ask /run/chaos/answer; "
    "setsid python3 /opt/chaos_probe.py </dev/null >/dev/null 2>&1 & "
    "head -c 1M /dev/urandom > /root/chaos.bin; : > /root/chaos.log; sync; "
    "sha256sum /root/chaos.bin"
)
ASK = "timeout 20 sh -c 'echo > /run/chaos/ask && cat /run/chaos/answer'"


class CountingVmm(QemuVmm):
    """The real VMM, counting the QEMU processes it spawns (a damaged snapshot must spawn
    none: counting the spawns is what proves it, not a look at the process table later)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned = 0

    async def _start(self, *args: Any, **kwargs: Any) -> QemuProcess:
        self.spawned += 1
        return await super()._start(*args, **kwargs)


@dataclass
class VmLab:
    """What every VM scenario shares: the network, the boot inputs and the image."""

    root: Path
    network: NetworkManager
    boot: BootInputs
    image: Path
    vmm: CountingVmm = field(default_factory=CountingVmm)

    @contextlib.asynccontextmanager
    async def host(self, vms_dir: Path) -> AsyncIterator[LocalHost]:
        """A host runtime over ``vms_dir``; a VMM that dies unasked fails the scenario."""
        exits: list[tuple[str, str]] = []

        async def on_exit(vm_id: str, reason: str) -> None:
            exits.append((vm_id, reason))

        host = LocalHost(
            vms_dir, boot=self.boot, network=self.network, vmm=self.vmm, on_exit=on_exit
        )
        try:
            yield host
        finally:
            await host.shutdown()
        if exits:
            raise StateLost(f"a VMM exited unexpectedly: {exits}")


async def open_lab(artifacts: GuestArtifacts, root: Path) -> VmLab:
    """Start the network and build the image (a cold boot plus a snapshot, ~20 s here).
    ``root`` must be short: unix socket paths stay under 108 bytes."""
    network = NetworkManager(root / "network", pool=POOL, tag="c" + secrets.token_hex(1))
    boot = BootInputs(artifacts)
    await asyncio.to_thread(root.mkdir)
    await network.start()
    try:
        provider = LocalMachineProvider(root, boot=boot, network=network)
        machine = await provider.start_app_machine(
            await provider.base_layer("debian12"), egress=False, memory_mib=MEMORY_MIB
        )
        try:
            await machine.put_file("/opt/chaos_probe.py", PROBE, mode=0o644)
            await machine.snapshot(root / "image")
        finally:
            await machine.shutdown()
    except BaseException:
        await close_lab_parts(root, network)
        raise
    return VmLab(root, network, boot, root / "image")


async def close_lab(lab: VmLab) -> None:
    await close_lab_parts(lab.root, lab.network)


async def close_lab_parts(root: Path, network: NetworkManager) -> None:
    with contextlib.suppress(Exception):
        await network.stop()
    await asyncio.to_thread(shutil.rmtree, root, True)


# --- the probe ------------------------------------------------------------------------------


@dataclass
class Probe:
    """The records one VM must keep, and how to check them (see the module doc)."""

    host: LocalHost
    vm_id: str
    pid: int = 0
    count: int = 0
    ram: str = ""
    file_sha: str = ""
    log: bytes = b""
    records: int = 0

    async def start(self) -> None:
        self.file_sha = (await self.sh(START)).split()[0]
        await self.check("started", write=False)

    async def sh(self, script: str) -> str:
        result = await self.host.agent(self.vm_id).exec(
            ["/bin/sh", "-c", script], timeout=EXEC_TIMEOUT
        )
        if result.exit_code != 0:
            raise StateLost(f"{script!r} failed in the guest: {result.stderr.decode()[-400:]}")
        return result.stdout.decode()

    async def check(self, label: str, *, write: bool = True) -> None:
        """Ask the probe (its counter moves one step) and compare all five records; with
        ``write``, append ``label`` to the log file on the guest's disk first. Not while the
        host's disk is full: a guest write that meets ENOSPC pauses the VM (QEMU's
        ``werror=enospc``, status ``io-error``) until something continues it."""
        self.count += 1
        append = f"echo {label} >> /root/chaos.log && sync && " if write else ""
        if write:
            self.log += f"{label}\n".encode()
        out = await self.sh(f"{ASK} && {append}sha256sum /root/chaos.bin /root/chaos.log")
        answer, bin_line, log_line = out.splitlines()
        pid, count, ram = answer.split()
        self.pid, self.ram = self.pid or int(pid), self.ram or ram
        got = (int(pid), int(count), ram, bin_line.split()[0], log_line.split()[0])
        want = (self.pid, self.count, self.ram, self.file_sha, hashlib.sha256(self.log).hexdigest())
        for name, g, w in zip(
            ("PID", "counter", "RAM sha256", "file", "log"), got, want, strict=True
        ):
            if g != w:
                raise StateLost(f"{self.vm_id} after {label}: {name} is {g!r}, expected {w!r}")
        self.records += len(want)


def suspend_dir(vms_dir: Path, vm_id: str) -> Path:
    return vms_dir / vm_dir_name(vm_id) / "suspend"


# --- scenario 1: suspend/resume soak --------------------------------------------------------


async def soak(lab: VmLab, cycles: int) -> Row:
    """``cycles`` suspend/resume cycles of one VM, every record checked after every resume."""
    vms = lab.root / "vms-soak"
    kinds: Counter[str] = Counter()
    suspend_s: list[float] = []
    resume_s: list[float] = []
    written: list[int] = []
    async with lab.host(vms) as host:
        await host.launch(LaunchSpec("chaos-soak", lab.image))
        probe = Probe(host, "chaos-soak")
        await probe.start()
        for cycle in range(1, cycles + 1):
            t0 = time.monotonic()
            await host.suspend(probe.vm_id)
            suspend_s.append(time.monotonic() - t0)
            manifest = await asyncio.to_thread(
                load_manifest, suspend_dir(vms, probe.vm_id), verify_hashes=False
            )
            kinds[manifest.kind] += 1
            written.append(manifest.files[snap.DEVICE_STATE].size)
            t0 = time.monotonic()
            await host.resume(probe.vm_id)
            resume_s.append(time.monotonic() - t0)
            await probe.check(f"cycle-{cycle}")
    kinds_seen = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
    return Row(
        "suspend/resume soak", cycles, 0, probe.records, 0,
        f"{kinds_seen}, device.state p50 {statistics.median(written) / (1 << 20):.1f} MiB; "
        f"suspend {_spread(suspend_s)}, resume {_spread(resume_s)}",
    )  # fmt: skip


def _spread(seconds: list[float]) -> str:
    return f"p50 {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s"


# --- scenario 2: the disk fills up during a suspend -------------------------------------------


@contextlib.contextmanager
def loop_filesystem(where: Path, mib: int) -> Any:
    """A fresh ext4 of ``mib`` MiB (no blocks reserved for root) mounted from a file."""
    image, mnt = where / "fs.img", where / "mnt"
    mnt.mkdir(parents=True)
    with image.open("wb") as f:
        f.truncate(mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        image.unlink()


def fill(mnt: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the filesystem with one file."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    subprocess.run(
        ["fallocate", "-l", str(st.f_bavail * st.f_frsize - leave), str(filler)], check=True
    )
    return filler


async def disk_full(lab: VmLab, rounds: int) -> Row:
    """``rounds`` times: fill the disk the VM's files are on, suspend (must fail, saying the
    disk is full, the VM running on untouched), free the disk, suspend and resume."""
    with loop_filesystem(lab.root / "full", 512) as mnt:
        image = mnt / "image"  # same filesystem as the VM: its suspend is the usual delta
        await asyncio.to_thread(copy_keeping_times, lab.image, image)
        vms = mnt / "vms"
        async with lab.host(vms) as host:
            await host.launch(LaunchSpec("chaos-full", image))
            probe = Probe(host, "chaos-full")
            await probe.start()
            for n in range(1, rounds + 1):
                filler = fill(mnt, leave=256 << 10)
                try:
                    await host.suspend(probe.vm_id)
                except SnapshotError as exc:
                    _check_refusal(exc, host, vms, probe.vm_id)
                else:
                    raise StateLost(f"round {n}: a suspend onto a full disk succeeded")
                await probe.check(f"full-{n}", write=False)  # runs on, memory intact
                filler.unlink()
                await host.suspend(probe.vm_id)
                await host.resume(probe.vm_id)
                await probe.check(f"freed-{n}")
    return Row("disk full during suspend", rounds, rounds, probe.records, 0,
               "each: refused with ENOSPC, VM ran on, then suspended and resumed")  # fmt: skip


def _check_refusal(exc: SnapshotError, host: LocalHost, vms: Path, vm_id: str) -> None:
    reason = state_reason("SuspendFailed", str(exc))  # what GetMicrovm would show
    if "No_space_left_on_device" not in reason:
        raise StateLost(f"a full disk is reported as {reason!r}")
    if not host.is_running(vm_id):
        raise StateLost(f"the VM stopped after a failed suspend: {exc}")
    left = sorted(p.name for p in (vms / vm_dir_name(vm_id)).iterdir() if "suspend" in p.name)
    if left:
        raise StateLost(f"a failed suspend left {left} behind")


# --- scenario 3: damaged snapshot files are refused at resume --------------------------------


def flip_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def cut_short(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGES: list[tuple[str, str, Callable[[Path], None]]] = [
    (name, how, fn)
    for name in (snap.DEVICE_STATE, snap.BASE_MEMORY, snap.DISK, snap.MANIFEST)
    for how, fn in (("flipped", flip_byte), ("truncated", cut_short))
]


async def damaged_snapshots(lab: VmLab, rounds: int) -> Row:
    """``rounds`` times (through ``DAMAGES`` in turn): suspend, damage one file of the
    snapshot, resume (must be refused naming the file, with no QEMU started), repair, resume
    (must work: the VM's records intact)."""
    vms = lab.root / "vms-damage"
    async with lab.host(vms) as host:
        await host.launch(LaunchSpec("chaos-damage", lab.image))
        probe = Probe(host, "chaos-damage")
        await probe.start()
        for n in range(rounds):
            name, how, damage = DAMAGES[n % len(DAMAGES)]
            await host.suspend(probe.vm_id)
            path = suspend_dir(vms, probe.vm_id) / name
            intact = await asyncio.to_thread(_damage_a_private_copy, path, damage)
            spawned = lab.vmm.spawned
            try:
                await host.resume(probe.vm_id)
            except SnapshotError as exc:
                if name not in str(exc):
                    raise StateLost(f"{name} {how}: the refusal does not name it: {exc}") from exc
            else:
                raise StateLost(f"{name} {how}: the VM resumed from a damaged snapshot")
            if lab.vmm.spawned != spawned:
                raise StateLost(f"{name} {how}: QEMU was started before the refusal")
            await asyncio.to_thread(os.replace, intact, path)
            await host.resume(probe.vm_id)
            await probe.check(f"repaired-{n + 1}")
    return Row("damaged snapshot files", rounds, rounds, probe.records, 0,
               f"{len(DAMAGES)} kinds of damage, each refused before QEMU started")  # fmt: skip


def copy_keeping_times(src: Path, dest: Path) -> None:
    """``cp -a``: holes stay holes, mtimes stay (a snapshot's stamps still match)."""
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dest)], check=True)


def _damage_a_private_copy(path: Path, damage: Callable[[Path], None]) -> Path:
    """Keep the intact file aside (a hard link, outside the snapshot) and damage a copy that
    has its times: ``base.memory`` is the image's own RAM file, which must stay intact."""
    intact = path.parent.parent / f"{path.name}.intact"
    os.link(path, intact)
    copy = path.with_name(f".{path.name}.copy")
    copy_keeping_times(path, copy)
    os.replace(copy, path)
    damage(path)
    return intact


def scenarios(lab: VmLab) -> list[Scenario]:
    return [
        Scenario("vm-soak", lambda size: soak(lab, size), 200),
        Scenario("vm-disk-full", lambda size: disk_full(lab, size), 10),
        Scenario("vm-damaged-snapshot", lambda size: damaged_snapshots(lab, size), 16),
    ]

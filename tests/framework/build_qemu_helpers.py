"""A test-only ``MachineProvider`` on real QEMU microVMs (TCG), for the build integration tests.

Not the runtime's provider (that is the host layer's job): it boots a QEMU microvm command line of
its own directly (the boot recipe of docs/GUEST_PROTOCOL.md; the runtime's command line is
``embervm.vmm.cmdline``), runs steps through the real guest agent
(``embervm.host.build_agent.AgentOps``) and freezes layers with QMP ``blockdev-snapshot-sync`` (the
running overlay becomes the layer, a new overlay on top takes the writes). Its ``snapshot`` is a
stand-in (a manifest and the sizes) — memory snapshots are the VMM's and are not exercised here.

Imported by this unique module name (no second ``conftest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from qemu.qmp import QMPClient

from embervm.guest.artifacts import GuestArtifacts, host_tsc_khz, kernel_cmdline
from embervm.guest.client import AgentClient
from embervm.host.build_agent import AgentOps
from embervm.imagebuild.cache import LayerRef
from embervm.imagebuild.machine import SnapshotSizes

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 512
BOOT_TIMEOUT = 90.0


def _argv(art: GuestArtifacts, workdir: Path, disk: Path, *, egress: bool) -> list[str]:
    tsc = host_tsc_khz()
    machine = "microvm,pit=off,pic=off" if tsc is not None else "microvm"
    cmdline = kernel_cmdline(guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=tsc)
    return [
        QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-M", machine, "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "1",
        "-m", f"{MEMORY_MIB}M",
        "-kernel", str(art.kernel), "-initrd", str(art.initrd), "-append", cmdline,
        "-serial", f"file:{workdir / 'console.log'}",
        "-drive", f"id=d0,file={disk},format=qcow2,if=none,cache=writeback",
        "-device", "virtio-blk-device,drive=d0",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={workdir / 'agent.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=org.embervm.agent",
        "-qmp", f"unix:{workdir / 'qmp.sock'},server=on,wait=off",
        "-netdev", "user,id=n0" + ("" if egress else ",restrict=on"),
        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
    ]  # fmt: skip


def _write_manifest(dest_dir: Path, data: dict[str, str]) -> None:
    dest_dir.mkdir(parents=True)
    (dest_dir / "manifest.json").write_text(json.dumps(data))


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


class QemuVm(AgentOps):
    """One booted VM: the agent operations plus layer freezing, stand-in snapshot, shutdown."""

    def __init__(
        self, client: AgentClient, proc: asyncio.subprocess.Process, workdir: Path, disk: Path
    ) -> None:
        super().__init__(client)
        self.proc = proc
        self.workdir = workdir
        self.disk = disk
        self.generation = 0

    async def commit_layer(self) -> LayerRef:
        result = await self.client.exec(["sync"], timeout=60)
        if result.exit_code != 0:
            raise RuntimeError("sync failed in the build VM")
        self.generation += 1
        frozen = self.disk
        new = self.workdir / f"disk-{self.generation}.qcow2"
        qmp = QMPClient("build-test")
        await qmp.connect(str(self.workdir / "qmp.sock"))
        try:
            await qmp.execute(
                "blockdev-snapshot-sync",
                {"device": "d0", "snapshot-file": str(new), "format": "qcow2"},
            )
        finally:
            await qmp.disconnect()
        self.disk = new
        return LayerRef(str(frozen), _allocated(frozen))

    async def snapshot(self, dest_dir: Path) -> SnapshotSizes:
        await asyncio.to_thread(_write_manifest, dest_dir, {"disk": str(self.disk)})
        return SnapshotSizes(MEMORY_MIB * 1024 * 1024, _allocated(self.disk))

    async def shutdown(self) -> None:
        await self.close()
        await self.client.close()
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


class QemuTestProvider:
    def __init__(
        self, artifacts: GuestArtifacts, root: Path, *, allow_egress: bool = False
    ) -> None:
        self.artifacts = artifacts
        self.allow_egress = allow_egress  # QEMU user networking to the outside (manual runs)
        self.root = root
        self.count = 0
        self.vms: list[QemuVm] = []

    async def base_layer(self, image: str) -> LayerRef:
        return LayerRef(str(self.artifacts.base_disk), 0)

    async def has_layer(self, layer: LayerRef) -> bool:
        return await asyncio.to_thread(Path(layer.id).exists)

    async def _boot(self, layer: LayerRef, *, egress: bool = False) -> QemuVm:
        self.count += 1
        workdir = self.root / f"vm-{self.count}"
        disk = workdir / "disk-0.qcow2"
        backing_format = "raw" if layer.id == str(self.artifacts.base_disk) else "qcow2"
        await asyncio.to_thread(workdir.mkdir, parents=True)
        create = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format,
            "-b", layer.id, str(disk),
        )  # fmt: skip
        if await create.wait() != 0:
            raise RuntimeError("qemu-img create failed")
        stderr = await asyncio.to_thread((workdir / "qemu.stderr").open, "wb")
        proc = await asyncio.create_subprocess_exec(
            *_argv(self.artifacts, workdir, disk, egress=egress and self.allow_egress),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        stderr.close()
        try:
            client = await AgentClient.connect(workdir / "agent.sock", timeout=BOOT_TIMEOUT)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        vm = QemuVm(client, proc, workdir, disk)
        self.vms.append(vm)
        if egress and self.allow_egress:
            # QEMU user networking answers DNS on 10.0.2.3, the guest is told 10.0.2.2 (the
            # runtime's resolver); point it at slirp's (this lands in the layer: test-only)
            fix = ["/bin/sh", "-c", "echo nameserver 10.0.2.3 > /etc/resolv.conf"]
            await client.exec(fix, timeout=30)
        return vm

    async def start_build_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> QemuVm:
        return await self._boot(layer, egress=egress)

    async def start_app_machine(self, layer: LayerRef, *, egress: bool, memory_mib: int) -> QemuVm:
        return await self._boot(layer)

    async def restore_app_machine(self, snapshot_dir: Path, *, egress: bool) -> QemuVm:
        raise NotImplementedError("memory snapshots are the VMM's; not exercised here")

    def running(self) -> list[int]:
        return [vm.proc.pid for vm in self.vms if vm.proc.returncode is None]

"""The lab of the QEMU VMM's integration tests: VMs booted or restored from the project's guest
artifacts, each tracked and killed at the end, and the module's image (one VM cold-booted and
snapshotted with a shell counter running) that the other tests restore clones of. The fixtures
(``lab_root``, ``image``, ``lab``) are re-exported by ``tests/integration/vmm/conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embervm.guest.artifacts import GuestArtifacts, host_tsc_khz, kernel_cmdline
from embervm.guest.client import AgentClient
from embervm.vmm import (
    QemuProcess,
    QemuVmm,
    VmConfig,
    create_overlay,
)

AGENT_TIMEOUT = 60.0


@dataclass
class Lab:
    art: GuestArtifacts
    root: Path
    vmm: QemuVmm = field(default_factory=QemuVmm)
    procs: list[QemuProcess] = field(default_factory=list)
    n: int = 0

    def cfg(self, memory_mib: int = 256, **kw: object) -> VmConfig:
        self.n += 1
        d = self.root / f"vm{self.n}"
        d.mkdir()
        cmd = kernel_cmdline(
            guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=host_tsc_khz()
        )
        return VmConfig.for_workdir(
            f"t{os.getpid()}-{self.n}", d, memory_mib=memory_mib, vcpus=1,
            kernel=self.art.kernel, initrd=self.art.initrd, cmdline=cmd,
            kernel_release=self.art.kernel_release, **kw,
        )  # fmt: skip

    def track(self, proc: QemuProcess) -> QemuProcess:
        self.procs.append(proc)
        return proc

    async def boot(self, **kw: object) -> tuple[QemuProcess, VmConfig]:
        cfg = self.cfg(**kw)
        create_overlay(self.art.base_disk, cfg.disk, "raw")
        return self.track(await self.vmm.boot(cfg)), cfg

    async def restore(
        self, snapshot_dir: Path, cfg: VmConfig | None = None, *, consume: bool = False
    ) -> tuple[QemuProcess, VmConfig]:
        cfg = cfg or self.cfg()
        return self.track(await self.vmm.restore(cfg, snapshot_dir, consume=consume)), cfg

    def qemu_pids_under(self, d: Path) -> list[int]:
        found = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError):
                    if str(d) in (p / "cmdline").read_bytes().decode(errors="replace"):
                        found.append(int(p.name))
        return found

    def kill_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for pid in self.qemu_pids_under(self.root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def agent(cfg: VmConfig, *, restored: bool = True) -> AgentClient:
    return await AgentClient.connect(
        cfg.agent_socket, timeout=AGENT_TIMEOUT, after_restore=restored
    )


async def sh(cfg: VmConfig, script: str) -> str:
    client = await agent(cfg)
    try:
        res = await client.exec(["/bin/sh", "-c", script], timeout=30)
    finally:
        await client.close()
    assert res.exit_code == 0, res
    return res.stdout.decode()


COUNTER = (
    "setsid sh -c 'echo $$ > /run/counter.pid; i=0; "
    "while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.05; done' "
    "</dev/null >/dev/null 2>&1 & sleep 0.5; cat /run/counter.pid"
)


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vmm")


@pytest.fixture(scope="module")
def image(guest_artifacts: GuestArtifacts, lab_root: Path) -> Iterator[tuple[Path, str]]:
    """An image snapshot with a shell counter running in guest memory; (dir, counter pid)."""
    lab = Lab(guest_artifacts, lab_root / "image")
    lab.root.mkdir()

    async def build() -> tuple[Path, str]:
        proc, cfg = await lab.boot()
        pid = (await sh(cfg, COUNTER)).strip()
        await proc.snapshot(lab.root / "snapshot")
        return lab.root / "snapshot", pid

    try:
        yield asyncio.run(build())
    finally:
        lab.kill_all()


@pytest.fixture
async def lab(guest_artifacts: GuestArtifacts, tmp_path: Path) -> AsyncIterator[Lab]:
    short = Path(f"/tmp/vmm-{os.getpid()}-{tmp_path.name[-12:]}")  # unix socket paths <108
    os.makedirs(short)
    lab = Lab(guest_artifacts, short)
    try:
        yield lab
    finally:
        for proc in lab.procs:
            with contextlib.suppress(Exception):
                await proc.kill()
        lab.kill_all()
        assert lab.qemu_pids_under(short) == []
        shutil.rmtree(short, ignore_errors=True)

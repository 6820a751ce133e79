"""The agent across a QEMU snapshot and restore, driven over raw QMP: the VM stopped and migrated
to a file, then a new QEMU started with ``-incoming`` from it and ``cont`` (the runtime's
restore, docs/SNAPSHOTS.md "Restore", in its plainest form).

What the guest side must get right: the restored agent still holds the host connection of
the snapshot in its memory; the new QEMU's chardev has a new client; the host's ``hello``
must succeed, reset stale sessions, keep apps running, and ``after_restore`` must fix the
clock the clone wakes up with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.framework.guest_vm_helpers import qemu_argv

from embervm.guest.artifacts import GuestArtifacts
from embervm.guest.client import AgentClient, AppSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds the base disk with mmdebstrap as root"),
    pytest.mark.timeout(300),
]


class Qmp:
    """Just enough QMP for the test: one command at a time, events skipped."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: Path) -> Qmp:
        async with asyncio.timeout(30):
            while True:
                try:
                    r, w = await asyncio.open_unix_connection(str(path))
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            q = cls(r, w)
            await r.readline()  # greeting
            await q.cmd("qmp_capabilities")
            return q

    async def cmd(self, name: str, **args: Any) -> Any:
        self.writer.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        async with asyncio.timeout(60):
            await self.writer.drain()
            while True:
                msg = json.loads(await self.reader.readline())
                if "return" in msg:
                    return msg["return"]
                if "error" in msg:
                    raise RuntimeError(f"QMP {name}: {msg['error']}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class Vm:
    def __init__(self, art: GuestArtifacts, workdir: Path) -> None:
        self.art, self.workdir = art, workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str) -> None:
        for f in ("agent.sock", "qmp.sock"):
            (self.workdir / f).unlink(missing_ok=True)
        argv = [
            *qemu_argv(self.art, self.workdir),
            "-qmp",
            f"unix:{self.workdir / 'qmp.sock'},server=on,wait=off",
            *extra,
        ]
        self.procs.append(
            subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
            )
        )

    def kill(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.fixture
def vm(guest_artifacts: GuestArtifacts, tmp_path: Path) -> Iterator[Vm]:
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            str(guest_artifacts.base_disk),
            str(tmp_path / "disk.qcow2"),
        ],
        check=True,
    )
    v = Vm(guest_artifacts, tmp_path)
    try:
        yield v
    finally:
        v.kill()


async def _wait_migration(qmp: Qmp) -> None:
    async with asyncio.timeout(120):
        while True:
            status = (await qmp.cmd("query-migrate")).get("status")
            if status == "completed":
                return
            assert status not in ("failed", "cancelled")
            await asyncio.sleep(0.05)


async def test_agent_answers_after_restore_with_apps_and_memory_intact(vm: Vm) -> None:
    vm.start()
    sock = vm.workdir / "agent.sock"
    c = await AgentClient.connect(sock, timeout=60)
    await c.start_app(AppSpec(argv=["sleep", "600"], name="sleeper"))
    await c.put_file("/dev/shm/marker", b"before-snapshot")
    boot_id = c.hello["boot_id"]
    assert await c.quiesce(auto_thaw=30)
    qmp = await Qmp.connect(vm.workdir / "qmp.sock")
    await qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 100 * 1024**3})
    await qmp.cmd("stop")
    await qmp.cmd("migrate", uri=f"exec:cat > {vm.workdir / 'snap.mig'}")
    await _wait_migration(qmp)
    await qmp.close()
    await c.close()
    vm.kill()
    vm.procs.clear()

    snapshot_taken = time.time_ns()
    vm.start("-incoming", f"exec:cat {vm.workdir / 'snap.mig'}")
    qmp = await Qmp.connect(vm.workdir / "qmp.sock")
    async with asyncio.timeout(60):
        while True:
            if (await qmp.cmd("query-status"))["status"] != "inmigrate":
                break
            await asyncio.sleep(0.05)
    await qmp.cmd("cont")
    await qmp.close()

    c2 = await AgentClient.connect(sock, timeout=60, after_restore=True)
    try:
        assert c2.hello["boot_id"] == boot_id  # the same guest, not a reboot
        assert c2.restore_result is not None
        assert c2.restore_result["thawed"] is True  # the snapshot was taken quiesced
        assert await c2.get_file("/dev/shm/marker", max_bytes=100) == b"before-snapshot"
        [app] = [a for a in await c2.app_status() if a["name"] == "sleeper"]
        assert app["state"] == "running"
        later = snapshot_taken + 3600 * 10**9
        res = await c2.after_restore(wall_clock_ns=later, entropy=os.urandom(32))
        assert res["clock_set"] is True
        assert abs(res["wall_clock_ns"] - later) < 60 * 10**9
        assert (await c2.exec(["touch", "/root/writable-after-restore"])).exit_code == 0
    finally:
        await c2.close()

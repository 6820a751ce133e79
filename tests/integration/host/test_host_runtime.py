"""LocalHost on real TCG microVMs, real network namespaces and nftables.

One image snapshot (a counter app in guest memory, built with the build provider from the
managed base layer) is shared by the module; each test launches VMs from it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from embervm.guest.artifacts import GuestArtifacts
from embervm.host import LaunchSpec, LocalHost, LocalMachineProvider
from embervm.host._boot import BootInputs, vm_dir_name
from embervm.imagebuild.machine import AppLaunch
from embervm.network import NetworkManager

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables, cgroups)"),
]

COUNTER_APP = b"""
import http.server
count = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global count
        count += 1
        body = f"count {count}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


@dataclass
class Env:
    root: Path
    network: NetworkManager
    boot: BootInputs
    snapshot: Path


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def env(guest_artifacts: GuestArtifacts) -> Iterator[Env]:
    root = Path(f"/tmp/emb-host-{os.getpid()}")  # short: unix socket paths stay < 108 bytes
    tag = "h" + secrets.token_hex(1)
    pool = f"10.212.{4 * secrets.randbelow(64)}.0/22"  # no other test draws from 10.212/16
    network = NetworkManager(root / "network", pool=pool, tag=tag)
    boot = BootInputs(guest_artifacts)
    loop = asyncio.new_event_loop()

    async def build() -> Path:
        await network.start()
        provider = LocalMachineProvider(root, boot=boot, network=network)
        machine = await provider.start_app_machine(
            await provider.base_layer("debian12"), egress=False, memory_mib=256
        )
        try:
            await machine.put_file("/opt/app.py", COUNTER_APP, mode=0o644)
            await machine.start_app(
                AppLaunch(("python3", "/opt/app.py")), on_output=lambda s, b: None
            )
            for _ in range(200):
                if await machine.probe_port(8080, timeout=1):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the counter app did not start")
            await machine.snapshot(root / "image")
        finally:
            await machine.shutdown()
        return root / "image"

    root.mkdir()
    try:
        snapshot = loop.run_until_complete(build())
        yield Env(root, network, boot, snapshot)
    finally:
        loop.run_until_complete(network.stop())
        loop.close()
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture
async def host(env: Env) -> AsyncIterator[tuple[LocalHost, list[tuple[str, str]]]]:
    exits: list[tuple[str, str]] = []

    async def on_exit(vm_id: str, reason: str) -> None:
        exits.append((vm_id, reason))

    host = LocalHost(env.root / "vms", boot=env.boot, network=env.network, on_exit=on_exit)
    try:
        yield host, exits
    finally:
        await host.shutdown()


async def get(address: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"http://{address}:8080/")
    assert response.status_code == 200
    return response.text


async def test_launch_from_snapshot_serves_and_survives_ten_suspend_resume_cycles(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, _ = host
    address = await runtime.launch(LaunchSpec("vm-a", env.snapshot))
    assert await get(address) == "count 1"
    assert await get(address) == "count 2"
    await runtime.agent("vm-a").exec(["sh", "-c", "echo kept > /root/file && sync"], timeout=30)
    for expected in range(3, 13):  # ten cycles in a row: neither files nor processes lost
        await runtime.suspend("vm-a")
        assert not runtime.is_running("vm-a")
        await runtime.resume("vm-a")
        assert await get(address) == f"count {expected}"
        kept = await runtime.agent("vm-a").get_file("/root/file", 64)
        assert kept == b"kept\n"
    result = await runtime.agent("vm-a").exec(["uname", "-r"], timeout=30)
    assert result.stdout.decode().strip() == env.boot.artifacts.kernel_release


async def test_two_launches_from_one_snapshot_are_independent(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, _ = host
    a, b = await asyncio.gather(
        runtime.launch(LaunchSpec("vm-b1", env.snapshot)),
        runtime.launch(LaunchSpec("vm-b2", env.snapshot)),
    )
    assert a != b
    assert await get(a) == "count 1"
    assert await get(a) == "count 2"
    assert await get(b) == "count 1"  # the other clone's memory is its own


async def test_terminate_releases_everything(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, _ = host
    await runtime.launch(LaunchSpec("vm-c", env.snapshot))
    netns = env.network.lookup("vm-c")
    assert netns is not None
    assert netns.netns in _netns_list()
    await runtime.terminate("vm-c")
    await runtime.terminate("vm-c")  # idempotent
    assert netns.netns not in _netns_list()
    assert list((env.root / "vms").iterdir()) == []


async def test_a_killed_vmm_is_reported_and_cleaned_up(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, exits = host
    await runtime.launch(LaunchSpec("vm-d", env.snapshot))
    pid = runtime._vms["vm-d"].process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if exits:
            break
        await asyncio.sleep(0.1)
    assert exits
    assert exits[0][0] == "vm-d"
    assert "unexpectedly" in exits[0][1]
    assert env.network.lookup("vm-d") is None
    assert runtime.address("vm-d") is None


async def test_launch_from_a_missing_snapshot_leaves_nothing(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, _ = host
    from embervm.errors import SnapshotError

    with pytest.raises(SnapshotError):
        await runtime.launch(LaunchSpec("vm-e", env.root / "no-such-snapshot"))
    assert env.network.lookup("vm-e") is None
    assert not (env.root / "vms").exists() or list((env.root / "vms").iterdir()) == []


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value for key, _, value in (line.partition(":") for line in lines)}


async def test_a_launched_vm_runs_in_the_jail_and_its_files_are_private(
    env: Env, host: tuple[LocalHost, list[tuple[str, str]]]
) -> None:
    runtime, _ = host
    old_umask = os.umask(0)  # the modes must not depend on the server's umask
    try:
        address = await runtime.launch(LaunchSpec("vm-j", env.snapshot))
        workdir = env.root / "vms" / vm_dir_name("vm-j")
        for _ in range(2):  # as launched, and again after a suspend and resume
            pid = json.loads((workdir / "process.json").read_text())["pid"]
            status = _proc_status(pid)
            assert "0" not in status["Uid"].split()
            assert "0" not in status["Gid"].split()
            assert int(status["CapEff"], 16) == 0
            assert os.readlink(f"/proc/{pid}/root") == str(workdir)
            assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
            for name in ("process.json", "disk.qcow2", "console.log", "qemu.stderr"):
                assert stat.S_IMODE((workdir / name).stat().st_mode) == 0o600, name
            assert await get(address)
            await runtime.suspend("vm-j")
            await runtime.resume("vm-j")
    finally:
        os.umask(old_umask)

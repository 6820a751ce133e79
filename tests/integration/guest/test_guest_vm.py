"""The agent in a real QEMU microvm (TCG): exec, files, PTY, clock, freeze, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.guest_vm_helpers import BootedVm, qemu_argv

from embervm.guest._rootfs import HOST_CA_BUNDLE, extra_certificates
from embervm.guest.artifacts import GuestArtifacts
from embervm.guest.client import AgentClient, AppSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds the base disk with mmdebstrap as root"),
    pytest.mark.timeout(300),
]

BOOT_TIMEOUT = 60.0


@pytest.fixture
async def agent(booted_vm: BootedVm) -> AsyncIterator[AgentClient]:
    client = await AgentClient.connect(booted_vm.agent_socket, timeout=BOOT_TIMEOUT)
    if not getattr(booted_vm, "_reported", False):
        sys.stderr.write(f"boot to agent ready: {time.monotonic() - booted_vm.started:.2f} s\n")
        object.__setattr__(booted_vm, "_reported", True)
    try:
        yield client
    finally:
        await client.close()


async def test_uname_shows_the_guest_kernel_release(
    agent: AgentClient, booted_vm: BootedVm
) -> None:
    r = await agent.exec(["uname", "-r"])
    assert r.exit_code == 0
    assert r.stdout.decode().strip() == booted_vm.artifacts.kernel_release
    assert agent.hello["pid"] == 1


async def test_exit_codes_and_streamed_output_are_intact(agent: AgentClient) -> None:
    r = await agent.exec(["sh", "-c", "echo to-out; echo to-err >&2; exit 42"])
    assert (r.exit_code, r.stdout, r.stderr) == (42, b"to-out\n", b"to-err\n")
    chunks: list[bytes] = []
    big = await agent.exec(
        ["sh", "-c", "head -c 2000000 /dev/urandom | tee /tmp/blob; sha256sum /tmp/blob >&2"],
        on_output=lambda stream, data: chunks.append(data) if stream == "stdout" else None,
    )
    assert big.exit_code == 0
    assert len(big.stdout) == 2_000_000
    assert b"".join(chunks) == big.stdout
    assert big.stderr.split()[0].decode() == hashlib.sha256(big.stdout).hexdigest()


async def test_exec_timeout_is_enforced_in_the_guest(agent: AgentClient) -> None:
    r = await agent.exec(["sleep", "60"], timeout=1)
    assert r.timed_out


async def test_file_put_and_get_round_trip(agent: AgentClient) -> None:
    data = os.urandom(600_000)
    await agent.put_file("/root/upload.bin", data, mode=0o640, uid=65534, gid=65534)
    r = await agent.exec(["stat", "-c", "%a %u %g %s", "/root/upload.bin"])
    assert r.stdout.decode().split() == ["640", "65534", "65534", "600000"]
    assert await agent.get_file("/root/upload.bin", max_bytes=1_000_000) == data


async def test_pty_session_runs_an_interactive_shell(agent: AgentClient) -> None:
    pty = await agent.open_pty(None, cols=132, rows=43)
    await pty.write(b"stty size; tty; exit 3\n")
    out = b""
    async for chunk in pty:
        out += chunk
    assert b"43 132" in out
    assert b"/dev/pts/" in out
    assert await pty.wait(timeout=30) == 3


async def test_after_restore_sets_the_wall_clock_and_reseeds(agent: AgentClient) -> None:
    target = time.time_ns() + 86_400 * 10**9  # one day ahead: clearly not the boot clock
    res = await agent.after_restore(wall_clock_ns=target, entropy=os.urandom(64))
    assert res["clock_set"] is True
    assert res["rng_reseeded"] is True
    r = await agent.exec(["date", "+%s"])
    assert abs(int(r.stdout) - target // 10**9) < 120
    await agent.after_restore(wall_clock_ns=time.time_ns())


async def test_guest_network_and_dns_are_configured(agent: AgentClient) -> None:
    r = await agent.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert "10.0.2.15/24" in r.stdout.decode()
    r = await agent.exec(["ip", "route", "show", "default"])
    assert "via 10.0.2.2" in r.stdout.decode()
    resolv = await agent.get_file("/etc/resolv.conf", max_bytes=4096)
    assert b"nameserver 10.0.2.2" in resolv


async def test_guest_trusts_every_certificate_the_host_trusts(agent: AgentClient) -> None:
    guest_bundle = await agent.get_file("/etc/ssl/certs/ca-certificates.crt", max_bytes=2**22)
    host_bundle = HOST_CA_BUNDLE.read_bytes()
    assert extra_certificates(host_bundle, guest_bundle) == []
    assert b"BEGIN CERTIFICATE" in guest_bundle


async def test_quiesce_freezes_root_until_thaw(agent: AgentClient) -> None:
    probe = ["sh", "-c", "fsfreeze --freeze / 2>&1; rc=$?; [ $rc = 0 ] && fsfreeze -u /; exit $rc"]
    assert await agent.quiesce(auto_thaw=60) is True
    try:
        frozen = await agent.exec(probe)
        assert frozen.exit_code != 0  # EBUSY: already frozen
    finally:
        await agent.thaw()
    thawed = await agent.exec(probe)
    assert thawed.exit_code == 0
    assert (await agent.exec(["touch", "/root/after-thaw"])).exit_code == 0


async def test_quiesce_thaws_itself_when_the_host_forgets(agent: AgentClient) -> None:
    assert await agent.quiesce(auto_thaw=1) is True
    r = await agent.exec(["sh", "-c", "touch /root/auto-thawed && echo ok"], timeout=60)
    assert r.stdout == b"ok\n"


async def test_app_survives_host_reconnect_and_logs_are_kept(booted_vm: BootedVm) -> None:
    c1 = await AgentClient.connect(booted_vm.agent_socket, timeout=BOOT_TIMEOUT)
    try:
        await c1.start_app(AppSpec(
            argv=["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"],
            name="ticker"))  # fmt: skip
    finally:
        await c1.close()
    await asyncio.sleep(1.0)  # the app keeps logging while no host is connected
    c2 = await AgentClient.connect(booted_vm.agent_socket, timeout=BOOT_TIMEOUT)
    try:
        [st] = [a for a in await c2.app_status() if a["name"] == "ticker"]
        assert st["state"] == "running"
        lines = []
        async with asyncio.timeout(30):
            async for line in c2.app_logs():
                lines.append(line.line)
                if len(lines) >= 3:
                    break
        assert all(ln.startswith(b"tick ") for ln in lines)
        await c2.stop_app("ticker", grace=5)
    finally:
        await c2.close()


async def test_supervised_app_serves_http_reachable_through_the_relay(agent: AgentClient) -> None:
    await agent.start_app(
        AppSpec(argv=["python3", "-m", "http.server", "8080", "--bind", "127.0.0.1"],
                cwd="/etc", name="web", restart="always")
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while True:
                if await agent.tcp_probe(8080):
                    break
                await asyncio.sleep(0.2)
        r = await agent.http_request(8080, "/hostname", method="GET")
        assert (r.status, r.body) == (200, b"embervm\n")
        host = await agent.exec(["hostname"])
        assert host.stdout == b"embervm\n"
    finally:
        await agent.stop_app("web", grace=5)


async def test_base_image_has_the_promised_packages(agent: AgentClient) -> None:
    pkgs = ["python3", "python3-venv", "python3-pip", "ca-certificates", "curl", "iproute2",
            "procps"]  # fmt: skip
    r = await agent.exec(["dpkg-query", "-W", "-f", "${Package} ${Status}\\n", *pkgs])
    assert r.exit_code == 0, r.stderr
    installed = {ln.split()[0] for ln in r.stdout.decode().splitlines() if "installed" in ln}
    assert installed == set(pkgs)


async def test_host_disconnect_mid_stream_leaves_the_agent_healthy(booted_vm: BootedVm) -> None:
    c1 = await AgentClient.connect(booted_vm.agent_socket, timeout=BOOT_TIMEOUT)
    got = asyncio.Event()
    task = asyncio.ensure_future(
        c1.exec(["sh", "-c", "while true; do head -c 65536 /dev/zero; done"],
                on_output=lambda s, d: got.set())
    )  # fmt: skip
    async with asyncio.timeout(30):
        await got.wait()
    await c1.close()  # vanish mid-stream, without a word
    with contextlib.suppress(Exception):
        await task
    c2 = await AgentClient.connect(booted_vm.agent_socket, timeout=BOOT_TIMEOUT)
    try:
        r = await c2.exec(["echo", "still here"])
        assert r.stdout == b"still here\n"
        # the old connection's session was killed by the new hello
        ps = await c2.exec(["sh", "-c", "ps -eo args | grep -c '[h]ead -c 65536' || true"])
        assert ps.stdout.strip() == b"0"
    finally:
        await c2.close()


def test_boot_without_a_disk_powers_off_with_a_message(
    guest_artifacts: GuestArtifacts, tmp_path: Path
) -> None:
    argv = qemu_argv(guest_artifacts, tmp_path)
    i = argv.index("-drive")
    del argv[i : i + 4]  # the drive and its virtio-blk device
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    assert proc.returncode == 0  # powered off, not hung, not crashed
    assert "embervm-init: no /dev/vda" in (tmp_path / "console.log").read_text()


def ignored_signals(status: str) -> list[int]:
    line = next(x for x in status.splitlines() if x.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return [sig for sig in range(1, 65) if mask & (1 << (sig - 1))]


async def test_programs_the_agent_starts_do_not_inherit_pid_1s_shield(agent: AgentClient) -> None:
    # The agent is PID 1 and survives SIGINT, SIGTERM and SIGHUP, with handlers: had it
    # ignored them, every exec, app and shell would start with them ignored (exec keeps an
    # ignored signal), and SIGTERM would not stop an app nor Ctrl-C a program in the shell.
    r = await agent.exec(["cat", "/proc/self/status"])
    shielded = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE}
    assert not shielded & set(ignored_signals(r.stdout.decode()))
    pty = await agent.open_pty(["sh", "-c", "cat /proc/self/status"])
    out = b""
    async for chunk in pty:
        out += chunk
    assert not shielded & set(ignored_signals(out.decode(errors="replace")))

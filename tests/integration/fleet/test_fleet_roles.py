"""The fleet's roles as real processes on a real PostgreSQL (docs/FLEET.md): an `--role api`
process places and writes intents, an `--role host` process builds the image and runs the VM,
an `--role proxy` process reaches it through the host's tunnel with a token the API minted
(keys in the store) and resumes it on traffic after a suspend; the host, SIGKILLed with its
VMMs, is declared LOST within its lease and its running VM is TERMINATED with a reason that
names it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.framework.integration_cache import test_cache_dir
from tests.framework.local_services import service_root, started_postgres
from tests.framework.server_harness import (
    REPO,
    LiveServer,
    build_image,
    free_port,
    run_vm,
    token,
    wait_for,
)

from embervm.guest.artifacts import GuestArtifacts
from embervm.localfleet import LocalPostgres
from embervm.store import HostRecord, open_repository

APP = REPO / "tests" / "integration" / "server" / "hardening_app"  # stdlib only: a quick build
LEASE_SECONDS = 10.0  # host.membership.DEFAULT_LEASE_SECONDS


@pytest.fixture
def postgres() -> Iterator[LocalPostgres]:
    with service_root("embervm-fleet-") as root, started_postgres(root) as pg:
        yield pg


def kill_vmms_of(data_dir: Path) -> list[int]:
    killed = []
    needle = str(data_dir).encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"qemu-system" in cmdline and needle in cmdline:
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
    return killed


def hosts_of(url: str) -> list[HostRecord]:
    async def read() -> list[HostRecord]:
        repo = await open_repository(url)
        try:
            return await repo.list_hosts()
        finally:
            await repo.close()

    return asyncio.run(read())


def fleet_cli(url: str, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "embervm.cli", "fleet", *args, "--database-url", url,
         "--output", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_api_host_and_proxy_run_serve_and_resume_a_vm_and_a_killed_host_is_lost_in_its_lease(
    postgres: LocalPostgres, guest_artifacts: GuestArtifacts, tmp_path: Path
) -> None:
    api_dir, host_dir, proxy_dir = tmp_path / "api", tmp_path / "host", tmp_path / "proxy"
    for folder in (api_dir, host_dir, proxy_dir):
        folder.mkdir()
    (host_dir / "artifacts").symlink_to(test_cache_dir() / "artifacts")
    tunnel = f"127.0.0.1:{free_port()}"
    api = LiveServer(
        api_dir, free_port(), free_port(), free_port(),
        extra_args=["--role", "api", "--database-url", postgres.url],
    )  # fmt: skip
    host = LiveServer(
        host_dir, free_port(), free_port(), free_port(),
        extra_args=[
            "--role", "host", "--host-id", "h1", "--advertise", tunnel,
            "--database-url", postgres.url, "--artifact-root", str(api_dir / "uploads"),
        ],
    )  # fmt: skip
    proxy = LiveServer(
        proxy_dir, free_port(), free_port(), free_port(),
        extra_args=["--role", "proxy", "--database-url", postgres.url],
    )  # fmt: skip
    try:
        host.start()
        assert host.ready_line == f"embervm ready host=h1 epoch=1 tunnel={tunnel}"
        api.start()
        assert api.ready_line.startswith("embervm ready api=http://127.0.0.1:")
        [registered] = hosts_of(postgres.url)
        assert (registered.host_id, registered.state, registered.address) == (
            "h1",
            "ACTIVE",
            tunnel,
        )
        assert registered.capabilities["accelerator"] in ("tcg", "kvm")

        image = build_image(api, "fleet-app", APP)  # built by the host: the API runs no build
        assert image["state"] == "CREATED", image
        policy = {"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600,
                  "autoResumeEnabled": True}  # fmt: skip
        vm = run_vm(api, "fleet-app", idlePolicy=policy)
        assert vm["state"] == "RUNNING", vm
        vm_id = vm["microvmId"]

        proxy.start()
        assert proxy.ready_line.startswith("embervm ready proxy=https://127.0.0.1:")
        secret = token(api, vm_id)  # sealed by the API, opened by the proxy: one key ring
        answer = proxy.get(vm_id, secret)
        assert answer.status_code == 200, answer.text
        assert "headers" in answer.json()  # the app in the VM on the host answered

        client = api.client()
        client.suspend_microvm(microvmIdentifier=vm_id)
        wait_for(
            lambda: client.get_microvm(microvmIdentifier=vm_id),
            lambda got: got["state"] == "SUSPENDED",
            120.0,
            "the host to suspend the VM",
        )
        resumed = proxy.get(vm_id, secret)  # auto-resume through the proxy, on its host
        assert resumed.status_code == 200, resumed.text
        assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "RUNNING"

        [listed] = fleet_cli(postgres.url, "hosts")
        assert listed == {
            "hostId": "h1", "state": "ACTIVE", "pid": listed["pid"], "address": tunnel,
            "epoch": 1, "memoryMiB": {"total": listed["memoryMiB"]["total"], "reserved": 1024},
            "microvms": [vm_id],
        }  # fmt: skip
        assert host.process is not None
        assert listed["pid"] == host.process.pid
        assert fleet_cli(postgres.url, "drain", "h1")["state"] == "DRAINING"
        with pytest.raises(client.exceptions.InsufficientCapacityException):
            client.run_microvm(imageIdentifier="fleet-app")  # no host takes new VMs

        assert host.process is not None
        host.process.send_signal(signal.SIGKILL)
        host.process.wait()
        assert kill_vmms_of(host_dir)  # the VM's QEMU dies with its host
        killed = time.monotonic()
        ended = wait_for(
            lambda: client.get_microvm(microvmIdentifier=vm_id),
            lambda got: got["state"] == "TERMINATED",
            60.0,
            "the lost host's VM to be terminated",
        )
        took = time.monotonic() - killed
        print(f"host killed -> its VM TERMINATED in {took:.1f} s (lease {LEASE_SECONDS} s)")
        assert ended["stateReason"] == "HostLost:the_host_h1_stopped_answering"
        assert took <= 2 * LEASE_SECONDS, took
        [lost] = hosts_of(postgres.url)
        assert lost.state == "LOST"
        assert fleet_cli(postgres.url, "hosts")[0]["microvms"] == []
    finally:
        proxy.stop()
        api.stop()
        host.stop()
        # A host restarted on its data dir reclaims what the killed one left (network, dirs).
        with contextlib.suppress(RuntimeError):
            host.start()
        host.stop()
        kill_vmms_of(host_dir)

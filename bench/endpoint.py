"""End-to-end endpoint benchmark on a real server: RunMicrovm → first HTTP byte, and the
extra latency of the first request to a SUSPENDED VM (auto-resume).

    .venv/bin/python bench/endpoint.py            # human table
    .venv/bin/python bench/endpoint.py --json     # machine-readable

Starts ``embervm server`` in a temp data dir (guest artifacts from the integration-test cache,
its own ports and network tag), builds examples/flask-counter, then measures with boto3 and
httpx through the endpoint proxy:
  - RunMicrovm → first 200 from the app (5 launches; the clock starts before the API call);
  - the reference, in the same run: a cold boot of the same image's disk, the same app started
    by the guest agent, first 200 from it (measured inside the guest, so no network either);
  - the first request to a SUSPENDED VM with auto-resume vs a request to the RUNNING VM, both on
    a new connection (3 cycles).
Targets (docs/PERFORMANCE.md): RunMicrovm → first byte ≥ 15x faster than cold boot → first byte, and
≤ 0.5 s absolute; auto-resume adds ≤ 0.5 s. Takes about 3 minutes (the build is most of it).
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import boto3
import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flask-counter"
REGION = "us-east-1"
BASE = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian12"
ROLE = "arn:aws:iam::000000000000:role/bench"
LAUNCHES = 5
RESUMES = 3
# What the flask-counter Dockerfile's CMD, ENV and WORKDIR say.
APP_ARGV = ["gunicorn", "--bind", "0.0.0.0:8080", "--workers", "1", "--threads", "4", "app:app"]
APP_ENV = {"PATH": "/app/venv/bin:/usr/local/bin:/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
APP_CWD = "/app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cache_dir() -> Path:
    env = os.environ.get("EMBERVM_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "embervm-test"


class Server:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.data.mkdir(parents=True)
        (self.data / "artifacts").symlink_to(cache_dir() / "artifacts")
        self.api, self.tls, self.http = free_port(), free_port(), free_port()
        env = {**os.environ, "EMBERVM_NETWORK_TAG": "bep", "EMBERVM_NETWORK_POOL": "10.227.0.0/16"}
        argv = [sys.executable, "-m", "embervm.cli", "--data-dir", str(self.data), "server",
                "--api-port", str(self.api), "--proxy-port", str(self.tls),
                "--proxy-http-port", str(self.http)]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env)  # fmt: skip
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith(b"embervm ready"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(600):
            self.stop()
            raise RuntimeError("the server did not start")
        parser = configparser.ConfigParser()
        parser.read(self.data / "credentials")
        section = parser["default"]
        self.client = boto3.client(
            "lambda-microvms", endpoint_url=f"http://127.0.0.1:{self.api}", region_name=REGION,
            aws_access_key_id=section["aws_access_key_id"],
            aws_secret_access_key=section["aws_secret_access_key"],
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def token(self, vm_id: str) -> str:
        answer = self.client.create_microvm_auth_token(
            microvmIdentifier=vm_id, expirationInMinutes=30, allowedPorts=[{"allPorts": {}}]
        )
        return str(answer["authToken"]["X-aws-proxy-auth"])

    def get(self, vm_id: str, token: str) -> httpx.Response:
        headers = {"host": f"{vm_id}.microvm.localhost", "x-aws-proxy-auth": token}
        return httpx.get(f"http://127.0.0.1:{self.http}/", headers=headers, timeout=60)

    def state(self, vm_id: str) -> str:
        return str(self.client.get_microvm(microvmIdentifier=vm_id)["state"])

    def wait_state(self, vm_id: str, wanted: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.state(vm_id) != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vm_id} did not become {wanted}")
            time.sleep(0.05)


def build(server: Server, root: Path) -> Path:
    archive = root / "app.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(EXAMPLE.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(EXAMPLE).as_posix())
    server.client.create_microvm_image(name="bench", baseImageArn=BASE, buildRoleArn=ROLE,
                                       codeArtifact={"uri": archive.as_uri()})  # fmt: skip
    deadline = time.monotonic() + 900
    while server.client.get_microvm_image(imageIdentifier="bench")["state"] == "CREATING":
        if time.monotonic() > deadline:
            raise RuntimeError("the build did not finish")
        time.sleep(1)
    image = server.client.get_microvm_image(imageIdentifier="bench")
    if image["state"] != "CREATED":
        raise RuntimeError(f"the build failed: {image}")
    return server.data / "images" / "000000000000" / "bench" / "1" / "snapshot"


def run_to_first_byte(server: Server) -> float:
    started = time.monotonic()
    vm_id = server.client.run_microvm(imageIdentifier="bench")["microvmId"]
    token = server.token(vm_id)
    while True:
        try:
            if server.get(vm_id, token).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > 120:
            raise RuntimeError("no answer from the app")
        time.sleep(0.01)
    elapsed = time.monotonic() - started
    server.client.terminate_microvm(microvmIdentifier=vm_id)
    return elapsed


def resume_cycles(server: Server) -> list[tuple[float, float]]:
    policy = {"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600,
              "autoResumeEnabled": True}  # fmt: skip
    vm_id = server.client.run_microvm(imageIdentifier="bench", idlePolicy=policy)["microvmId"]
    server.wait_state(vm_id, "RUNNING")
    token = server.token(vm_id)
    server.get(vm_id, token)
    cycles = []
    for _ in range(RESUMES):
        t0 = time.monotonic()
        assert server.get(vm_id, token).status_code == 200
        running = time.monotonic() - t0
        server.client.suspend_microvm(microvmIdentifier=vm_id)
        server.wait_state(vm_id, "SUSPENDED")
        t0 = time.monotonic()
        assert server.get(vm_id, token).status_code == 200
        cycles.append((running, time.monotonic() - t0))
    server.client.terminate_microvm(microvmIdentifier=vm_id)
    return cycles


async def cold_boot_to_first_byte(snapshot: Path, root: Path) -> float:
    """The same image's disk booted cold, the app started by the agent, first 200 in-guest."""
    from embervm.guest.artifacts import ensure_guest_artifacts, host_tsc_khz, kernel_cmdline
    from embervm.guest.client import AgentClient, AppSpec
    from embervm.vmm import QemuVmm, VmConfig, create_overlay

    art = await ensure_guest_artifacts(cache_dir() / "artifacts")
    work = root / "cold"
    work.mkdir()
    cmdline = kernel_cmdline(guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24,
                             tsc_khz=host_tsc_khz())  # fmt: skip
    cfg = VmConfig.for_workdir("cold", work, memory_mib=1024, vcpus=1, kernel=art.kernel,
                               initrd=art.initrd, cmdline=cmdline,
                               kernel_release=art.kernel_release)  # fmt: skip
    create_overlay(snapshot / "disk.qcow2", cfg.disk, "qcow2")
    started = time.monotonic()
    proc = await QemuVmm().boot(cfg)
    try:
        agent = await AgentClient.connect(cfg.agent_socket, timeout=120)
        await agent.start_app(AppSpec(argv=APP_ARGV, env=APP_ENV, cwd=APP_CWD))
        while True:
            try:
                answer = await agent.http_request(8080, "/", method="GET", timeout=5)
                if answer.status == 200:
                    break
            except Exception:  # not listening yet
                await asyncio.sleep(0.05)
            if time.monotonic() - started > 180:
                raise RuntimeError("the cold-booted app never answered")
        elapsed = time.monotonic() - started
        await agent.close()
        return elapsed
    finally:
        await proc.kill()


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="embervm-bench-endpoint-"))
    server = Server(root)
    try:
        snapshot = build(server, root)
        launches = sorted(run_to_first_byte(server) for _ in range(LAUNCHES))
        cycles = resume_cycles(server)
        cold = asyncio.run(cold_boot_to_first_byte(snapshot, root))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    run_p50 = launches[len(launches) // 2]
    extra = sorted(suspended - running for running, suspended in cycles)
    return {
        "run_to_first_byte_s": launches,
        "run_to_first_byte_p50_s": run_p50,
        "cold_boot_to_first_byte_s": cold,
        "cold_over_run": cold / run_p50,
        "resume_cycles_running_vs_suspended_s": cycles,
        "auto_resume_extra_p50_s": extra[len(extra) // 2],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    res = run()
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    p50, cold, extra = res["run_to_first_byte_p50_s"], res["cold_boot_to_first_byte_s"], res[
        "auto_resume_extra_p50_s"]  # fmt: skip
    print(f"RunMicrovm -> first byte p50: {p50:.3f} s  (all: "
          f"{', '.join(f'{t:.3f}' for t in res['run_to_first_byte_s'])})")  # fmt: skip
    print(f"cold boot -> first byte (same image): {cold:.2f} s")
    ratio = res["cold_over_run"]
    print(f"cold / restore: {ratio:.1f}x (target >= 15x) {'MET' if ratio >= 15 else 'MISSED'}")
    print(f"RunMicrovm -> first byte <= 0.5 s: {'MET' if p50 <= 0.5 else 'MISSED'}")
    print(f"auto-resume extra latency p50: {extra:.3f} s (target <= 0.5 s) "
          f"{'MET' if extra <= 0.5 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

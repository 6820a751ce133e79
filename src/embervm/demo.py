"""``make demo``: start a server, build the example app, run it, suspend, auto-resume, terminate.

Each step prints the state it reached and how long it took. Safe to run twice: it reuses a
server that is already up (and then leaves it running), rebuilds the image as a new version (the
step cache makes that quick) and always terminates the VM and stops the server it started, also
when interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from embervm.cli import _app
from embervm.cli._context import CliContext, CliError
from embervm.cli.images import BASE_IMAGE_ARN, DEFAULT_BUILD_ROLE, upload_context
from embervm.cli.microvms import connector, endpoint_request, wait_for_state
from embervm.config import DataDir

IMAGE_NAME = "flask-counter"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / IMAGE_NAME
SERVER_START_TIMEOUT = 1200.0  # the first start builds the guest kernel and base image
BUILD_TIMEOUT = 1200.0


def say(step: str, detail: str = "", seconds: float | None = None) -> None:
    timing = f" ({seconds:.2f} s)" if seconds is not None else ""
    print(f"==> {step}{': ' + detail if detail else ''}{timing}", flush=True)


def server_is_up(ctx: CliContext) -> bool:
    try:
        return httpx.get(f"{ctx.endpoint_url}/ping", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_server(ctx: CliContext) -> Iterator[None]:
    """Use the server that answers /ping, or start one and stop it afterwards."""
    if server_is_up(ctx):
        say("server", f"already running at {ctx.endpoint_url}, using it")
        yield
        return
    log_path = DataDir(ctx.data_dir).demo_log
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    say("server", f"starting (log: {log_path}); the first start builds the guest kernel and image")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "embervm.cli", "--data-dir", str(ctx.data_dir), "server"],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    try:
        _wait_ready(process, started)
        say("server", "ready", time.monotonic() - started)
        yield
    finally:
        _stop(process)
        say("server", "stopped")


def _wait_ready(process: subprocess.Popen[bytes], started: float) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        print(f"    {line}", flush=True)
        if line.startswith("embervm ready"):
            return
        if time.monotonic() - started > SERVER_START_TIMEOUT:
            break
    raise CliError(f"the server did not become ready (exit code {process.poll()})")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def build_image(ctx: CliContext) -> str:
    client = ctx.client()
    uri = upload_context(ctx, EXAMPLE)
    request: dict[str, Any] = {
        "baseImageArn": BASE_IMAGE_ARN.format(region=ctx.region, name="debian12"),
        "buildRoleArn": DEFAULT_BUILD_ROLE,
        "codeArtifact": {"uri": uri},
    }
    started = time.monotonic()
    try:
        client.get_microvm_image(imageIdentifier=IMAGE_NAME)
        image = client.update_microvm_image(imageIdentifier=IMAGE_NAME, **request)
    except client.exceptions.ResourceNotFoundException:
        image = client.create_microvm_image(name=IMAGE_NAME, **request)
    version = str(image["imageVersion"])
    say("build", f"{IMAGE_NAME} version {version} {image['state']}")
    while True:
        current = client.get_microvm_image_version(imageIdentifier=IMAGE_NAME, imageVersion=version)
        if current["state"] in {"SUCCESSFUL", "FAILED"}:
            break
        if time.monotonic() - started > BUILD_TIMEOUT:
            raise CliError(f"the build did not finish in {BUILD_TIMEOUT:.0f} s")
        time.sleep(2)
    if current["state"] == "FAILED":
        raise CliError(f"the build failed: {current.get('stateReason', 'no reason given')}")
    say("build", f"{IMAGE_NAME} version {version} {current['state']}", time.monotonic() - started)
    return version


def call(vm_id: str, label: str) -> None:
    started = time.monotonic()
    response = endpoint_request(vm_id, "/")
    body = response.text.strip()
    say(label, f"HTTP {response.status_code} {body}", time.monotonic() - started)
    if response.status_code != 200:
        raise CliError(f"the app answered {response.status_code}")


def demo(ctx: CliContext) -> None:
    client = ctx.client()
    build_image(ctx)
    started = time.monotonic()
    vm = client.run_microvm(
        imageIdentifier=IMAGE_NAME,
        ingressNetworkConnectors=[connector("ALL_INGRESS")],
        idlePolicy={
            "maxIdleDurationSeconds": 600,
            "suspendedDurationSeconds": 600,
            "autoResumeEnabled": True,
        },
    )
    vm_id = str(vm["microvmId"])
    try:
        state = wait_for_state(vm_id, {"RUNNING"}, timeout=300)["state"]
        say("run", f"{vm_id} {state}", time.monotonic() - started)
        say("endpoint", str(vm["endpoint"]))
        call(vm_id, "call 1")
        call(vm_id, "call 2")
        started = time.monotonic()
        client.suspend_microvm(microvmIdentifier=vm_id)
        state = wait_for_state(vm_id, {"SUSPENDED"}, timeout=120)["state"]
        say("suspend", f"{vm_id} {state}", time.monotonic() - started)
        call(vm_id, "call 3 (auto-resume)")
        state = client.get_microvm(microvmIdentifier=vm_id)["state"]
        say("state", f"{vm_id} {state}")
    finally:
        started = time.monotonic()
        with contextlib.suppress(Exception):
            client.terminate_microvm(microvmIdentifier=vm_id)
            state = wait_for_state(vm_id, {"TERMINATED"}, timeout=120)["state"]
            say("terminate", f"{vm_id} {state}", time.monotonic() - started)


def main() -> int:
    ctx = CliContext()
    if os.environ.get("EMBERVM_ENDPOINT_URL"):
        ctx.endpoint_url = os.environ["EMBERVM_ENDPOINT_URL"].rstrip("/")
    _app._state["ctx"] = ctx
    try:
        with running_server(ctx):
            demo(ctx)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    except CliError as exc:
        print(f"demo failed: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print("demo finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lifecycle hooks on a real VM: ready (503 retried) at build time; run with the payload,
suspend, resume, terminate at run time; a /run that times out terminates the VM with a reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.framework.server_harness import LiveServer, build_image, run_vm, token, wait_for

pytestmark = pytest.mark.timeout(900)

HOOKS = {
    "port": 8080,
    "microvmImageHooks": {"ready": "ENABLED", "readyTimeoutInSeconds": 60},
    "microvmHooks": {
        "run": "ENABLED", "runTimeoutInSeconds": 2,
        "resume": "ENABLED", "resumeTimeoutInSeconds": 5,
        "suspend": "ENABLED", "suspendTimeoutInSeconds": 5,
        "terminate": "ENABLED", "terminateTimeoutInSeconds": 5,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def hooks_image(live_server: LiveServer) -> dict[str, Any]:
    image = build_image(live_server, "hooks", Path(__file__).parent / "hooks_app", hooks=HOOKS)
    assert image["state"] == "CREATED", image
    return image


def calls(server: LiveServer, vm_id: str) -> list[dict[str, Any]]:
    answer = server.get(vm_id, token(server, vm_id), "/calls")
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def state(server: LiveServer, vm_id: str) -> dict[str, Any]:
    return dict(server.client().get_microvm(microvmIdentifier=vm_id))


def test_ready_was_retried_until_200(live_server: LiveServer, hooks_image: dict[str, Any]) -> None:
    client = live_server.client()
    version = client.get_microvm_image_version(imageIdentifier="hooks", imageVersion="1")
    assert version["state"] == "SUCCESSFUL"
    vm_id = run_vm(live_server, "hooks", runHookPayload="first")["microvmId"]
    ready = [c for c in calls(live_server, vm_id) if c["hook"] == "ready"]
    assert [c["status"] for c in ready] == [503, 503, 200]  # recorded in the snapshot's memory
    client.terminate_microvm(microvmIdentifier=vm_id)


def test_run_suspend_resume_hooks_in_order_with_the_payload(
    live_server: LiveServer, hooks_image: dict[str, Any]
) -> None:
    client = live_server.client()
    policy = {"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600,
              "autoResumeEnabled": True}  # fmt: skip
    vm_id = run_vm(live_server, "hooks", runHookPayload="hello-payload", idlePolicy=policy)[
        "microvmId"
    ]
    client.suspend_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: state(live_server, vm_id)["state"], lambda s: s == "SUSPENDED", 120, "suspend")
    client.resume_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: state(live_server, vm_id)["state"], lambda s: s == "RUNNING", 120, "resume")
    seen = [(c["hook"], c["payload"]) for c in calls(live_server, vm_id) if c["hook"] != "ready"]
    assert seen == [("run", "hello-payload"), ("suspend", ""), ("resume", "")]
    client.terminate_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: state(live_server, vm_id)["state"], lambda s: s == "TERMINATED", 120,
             "terminate")  # fmt: skip
    logs = _app_log(live_server, vm_id)
    assert "hook terminate payload=''" in logs  # the app saw /terminate before it was stopped


def test_a_run_hook_past_its_timeout_terminates_the_vm_with_a_reason(
    live_server: LiveServer, hooks_image: dict[str, Any]
) -> None:
    client = live_server.client()
    vm = client.run_microvm(imageIdentifier="hooks", runHookPayload="slow")
    final = wait_for(
        lambda: state(live_server, vm["microvmId"]),
        lambda v: v["state"] in ("TERMINATED", "RUNNING"),
        120,
        "the launch",
    )
    assert final["state"] == "TERMINATED"
    assert "run_hook" in str(final.get("stateReason", ""))


def _app_log(server: LiveServer, vm_id: str) -> str:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    url = f"{server.api_url}/embervm/v1/microvms/{vm_id}/logs"
    request = AWSRequest(method="GET", url=url, data=b"")
    SigV4Auth(server.client()._request_signer._credentials, "lambda", "us-east-1").add_auth(request)
    return httpx.get(url, headers=dict(request.headers.items()), timeout=30).text

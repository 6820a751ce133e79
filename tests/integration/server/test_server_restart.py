"""A server restart keeps every record; a RUNNING VM keeps running through it (its VMM is
re-attached) and a SUSPENDED VM can be resumed after it."""

from __future__ import annotations

from typing import Any

import pytest
from tests.framework.server_harness import LiveServer, run_vm, token, wait_for

pytestmark = pytest.mark.timeout(900)


def test_restart_keeps_records_and_suspended_vms(
    live_server: LiveServer, flask_image: dict[str, Any]
) -> None:
    policy = {"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600,
              "autoResumeEnabled": True}  # fmt: skip
    vm_id = run_vm(live_server, "flask-counter", idlePolicy=policy)["microvmId"]
    count = live_server.get(vm_id, token(live_server, vm_id)).text
    running = run_vm(live_server, "flask-counter")["microvmId"]
    running_count = live_server.get(running, token(live_server, running)).text
    live_server.client().suspend_microvm(microvmIdentifier=vm_id)
    wait_for(
        lambda: live_server.client().get_microvm(microvmIdentifier=vm_id)["state"],
        lambda s: s == "SUSPENDED", 120, "SUSPENDED",
    )  # fmt: skip
    images_before = live_server.client().list_microvm_images()["items"]

    assert live_server.stop() == 0
    live_server.start()

    client = live_server.client()
    assert client.list_microvm_images()["items"] == images_before
    assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "SUSPENDED"
    after = live_server.get(vm_id, token(live_server, vm_id)).text  # auto-resume
    assert int(after.split(":")[1]) == int(count.split(":")[1]) + 1
    assert client.get_microvm(microvmIdentifier=running)["state"] == "RUNNING"
    still = live_server.get(running, token(live_server, running)).text  # same process, same memory
    assert int(still.split(":")[1]) == int(running_count.split(":")[1]) + 1
    for vm in (vm_id, running):
        client.terminate_microvm(microvmIdentifier=vm)

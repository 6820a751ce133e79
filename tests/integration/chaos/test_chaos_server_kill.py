"""SIGKILL of the real server inside launch, suspend, resume, terminate and a build; after the
restart on the same data dir every record is stable and true (``check_reality``): no VM lost,
none running twice, no QEMU, namespace or nftables entry left to nobody, and a RUNNING VM
serves its app through the proxy. ``bench/chaos_server.py kill`` tries more moments."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tests.framework.chaos_server_harness import (
    APP_NAME,
    build_vm_pids,
    chaos_server,
    check_reality,
    kill_and_restart,
    poll,
    vm_pids,
    vm_workdir,
    write_app,
)
from tests.framework.server_harness import (
    LiveServer,
    build_image,
    run_vm,
    token,
    wait_built,
    wait_for,
    zip_dir,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with chaos_server(tmp_path_factory.mktemp("chaos-server")) as live:
        image = build_image(live, APP_NAME, write_app(live.data_dir / "app-src"))
        assert image["state"] == "CREATED", image
        yield live


def _running_vm(server: LiveServer) -> str:
    vm = run_vm(server, APP_NAME)
    assert vm["state"] == "RUNNING", vm
    return str(vm["microvmId"])


def _state(server: LiveServer, vm_id: str) -> str:
    return str(server.client().get_microvm(microvmIdentifier=vm_id)["state"])


def _serves(server: LiveServer, vm_id: str) -> int:
    answer = server.get(vm_id, token(server, vm_id))
    assert answer.status_code == 200, answer.text
    return int(answer.text.split(":")[1])


def test_kill_when_the_launch_has_started_its_vmm(server: LiveServer) -> None:
    vm_id = server.client().run_microvm(
        imageIdentifier=APP_NAME,
        ingressNetworkConnectors=[
            "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS"
        ],
    )["microvmId"]
    poll(lambda: vm_pids(server, vm_id), 60, "the launch's QEMU")
    kill_and_restart(server)
    records = check_reality(server, [vm_id])
    assert records[vm_id]["state"] in ("RUNNING", "TERMINATED"), records


def test_kill_while_the_suspend_snapshot_is_written(server: LiveServer) -> None:
    vm_id = _running_vm(server)
    count = _serves(server, vm_id)
    server.client().suspend_microvm(microvmIdentifier=vm_id)
    workdir = vm_workdir(server, vm_id)
    poll(lambda: list(workdir.glob(".suspend.tmp-*")), 60, "the suspend's temp dir")
    kill_and_restart(server)
    records = check_reality(server, [vm_id])
    state = records[vm_id]["state"]
    assert state in ("RUNNING", "SUSPENDED"), records  # the VM is not lost
    if state == "SUSPENDED":
        server.client().resume_microvm(microvmIdentifier=vm_id)
        wait_for(lambda: _state(server, vm_id), lambda s: s == "RUNNING", 120, "RUNNING")
    assert _serves(server, vm_id) > count  # same process, same memory (a new one counts from 1)
    check_reality(server, [vm_id])


def test_kill_after_the_suspend_committed(server: LiveServer) -> None:
    vm_id = _running_vm(server)
    count = _serves(server, vm_id)
    server.client().suspend_microvm(microvmIdentifier=vm_id)
    poll(lambda: (vm_workdir(server, vm_id) / "suspend" / "manifest.json").exists(), 60, "commit")
    kill_and_restart(server)
    records = check_reality(server, [vm_id])
    assert records[vm_id]["state"] == "SUSPENDED", records
    server.client().resume_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: _state(server, vm_id), lambda s: s == "RUNNING", 120, "RUNNING")
    assert _serves(server, vm_id) > count
    check_reality(server, [vm_id])


def test_kill_when_the_resume_has_started_its_vmm(server: LiveServer) -> None:
    vm_id = _running_vm(server)
    count = _serves(server, vm_id)
    server.client().suspend_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: _state(server, vm_id), lambda s: s == "SUSPENDED", 120, "SUSPENDED")
    server.client().resume_microvm(microvmIdentifier=vm_id)
    poll(lambda: vm_pids(server, vm_id), 60, "the resume's QEMU")
    kill_and_restart(server)
    records = check_reality(server, [vm_id])
    assert records[vm_id]["state"] in ("RUNNING", "SUSPENDED"), records
    if records[vm_id]["state"] == "SUSPENDED":
        server.client().resume_microvm(microvmIdentifier=vm_id)
        wait_for(lambda: _state(server, vm_id), lambda s: s == "RUNNING", 120, "RUNNING")
    assert _serves(server, vm_id) > count
    check_reality(server, [vm_id])


def test_kill_during_terminate(server: LiveServer) -> None:
    vm_id = _running_vm(server)
    server.client().terminate_microvm(microvmIdentifier=vm_id)
    kill_and_restart(server)
    records = check_reality(server, [vm_id])
    assert records[vm_id]["state"] == "TERMINATED", records


def test_kill_during_a_build_fails_it_with_a_reason_and_a_retry_builds(
    server: LiveServer,
) -> None:
    source = write_app(server.data_dir / "app-src-2")
    (source / "app.py").write_text((source / "app.py").read_text() + "# version 2\n")
    archive = zip_dir(source, server.data_dir / "uploads" / "chaos-2.zip")
    params: dict[str, Any] = {
        "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
        "buildRoleArn": "arn:aws:iam::000000000000:role/embervm-build",
        "codeArtifact": {"uri": archive.as_uri()},
    }
    server.client().create_microvm_image(name="chaos-build", **params)
    poll(lambda: build_vm_pids(server), 120, "the build VM")
    kill_and_restart(server)
    image = wait_built(server, "chaos-build")
    assert image["state"] == "CREATE_FAILED", image
    version = server.client().get_microvm_image_version(
        imageIdentifier="chaos-build", imageVersion=image["latestFailedImageVersion"]
    )
    assert version["stateReason"], version
    assert build_vm_pids(server) == [], "a build VM of the killed server still runs"
    server.client().update_microvm_image(imageIdentifier="chaos-build", **params)
    assert wait_built(server, "chaos-build")["state"] == "UPDATED"
    check_reality(server, [])

"""MicroVM operations: run, state machine, tokens, quotas, capacity, throttling, metering."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from tests.framework.core_unit_harness import ALL_INGRESS, Rig, make_rig
from tests.framework.fake_core import FakeBuilder, FakeHost

from embervm.config import Settings
from embervm.contracts import PortGrant
from embervm.core import Caller, CoreLimits, RateLimit
from embervm.errors import (
    ConflictError,
    InsufficientCapacityError,
    InternalError,
    NotFoundError,
    QuotaExceededError,
    ThrottledError,
    ValidationError,
    VmmError,
)
from embervm.store import open_repository

CONNECTOR = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:{}"


async def test_run_returns_pending_at_once_then_the_vm_runs(rig: Rig) -> None:
    await rig.image()
    rig.host.gates.hold("launch")
    out = await rig.call("RunMicrovm", {"imageIdentifier": "web"})
    assert out["state"] == "PENDING"
    rig.host.gates.release("launch")
    await rig.settle()
    assert await rig.state(out["microvmId"]) == "RUNNING"


async def test_endpoint_is_id_under_domain_on_proxy_port(rig: Rig) -> None:
    await rig.image()
    vm = await rig.run()
    assert re.fullmatch(r"mvm-[0-9a-f]{20}", vm["microvmId"])
    assert vm["endpoint"] == f"https://{vm['microvmId']}.microvm.localhost:8443"


async def test_launch_gets_snapshot_egress_hooks_and_run_hook_payload(rig: Rig) -> None:
    await rig.image(resources=[{"minimumMemoryInMiB": 4096}], hooks={"port": 9000})
    vm = await rig.run(runHookPayload='{"tenant": 7}', egressNetworkConnectors=[])
    spec = rig.host.specs[vm["microvmId"]]
    assert spec.egress is False
    assert (spec.run_hook_payload, spec.hooks) == ('{"tenant": 7}', {"port": 9000})
    assert spec.snapshot_dir == rig.settings.images_dir / "web" / "1" / "snapshot"


@pytest.mark.parametrize(("memory", "vcpus"), [(512, 1), (2048, 1), (4096, 2)])
async def test_a_vm_is_admitted_with_its_image_size_and_one_vcpu_per_2_gib(
    rig: Rig, memory: int, vcpus: int
) -> None:
    await rig.image(resources=[{"minimumMemoryInMiB": memory}])
    vm = await rig.run()
    record = await rig.repo.get_microvm(vm["microvmId"])
    assert record is not None
    assert (record.memory_mib, record.vcpus) == (memory, vcpus)


async def test_default_connectors_are_http_ingress_and_internet_egress(rig: Rig) -> None:
    await rig.image()
    vm = await rig.run()
    assert vm["ingressNetworkConnectors"] == [CONNECTOR.format("HTTP_INGRESS")]
    assert vm["egressNetworkConnectors"] == [CONNECTOR.format("INTERNET_EGRESS")]


async def test_bare_connector_names_are_stored_as_arns(rig: Rig) -> None:
    await rig.image()
    vm = await rig.run(ingressNetworkConnectors=["SHELL_INGRESS", "HTTP_INGRESS"])
    assert vm["ingressNetworkConnectors"] == [
        CONNECTOR.format("SHELL_INGRESS"),
        CONNECTOR.format("HTTP_INGRESS"),
    ]


@pytest.mark.parametrize(
    "ingress",
    [
        ["ALL_INGRESS", "HTTP_INGRESS"],
        [ALL_INGRESS, CONNECTOR.format("SHELL_INGRESS")],
        ["NO_INGRESS", "HTTP_INGRESS"],
        ["TCP_INGRESS"],
        ["arn:aws:lambda:us-east-1:123456789012:network-connector:mine:HTTP_INGRESS"],
    ],
)
async def test_invalid_ingress_connectors_are_refused(rig: Rig, ingress: list[str]) -> None:
    await rig.image()
    with pytest.raises(ValidationError, match="ingressNetworkConnectors"):
        await rig.call(
            "RunMicrovm", {"imageIdentifier": "web", "ingressNetworkConnectors": ingress}
        )


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("RunMicrovm", {"imageIdentifier": "web"}),
        ("CreateMicrovmImage", {"name": "other", "baseImageArn": "x", "buildRoleArn": "y",
                                "codeArtifact": {"uri": "file:///nowhere.zip"}}),
        ("UpdateMicrovmImage", {"imageIdentifier": "web", "baseImageArn": "x",
                                "buildRoleArn": "y", "codeArtifact": {"uri": "file:///n.zip"}}),
    ],
)  # fmt: skip
async def test_a_customer_managed_kms_key_is_refused_not_ignored(
    rig: Rig, operation: str, params: dict[str, Any]
) -> None:
    await rig.image()
    key = "arn:aws:kms:us-east-1:123456789012:key/abcd-1234"
    with pytest.raises(ValidationError, match="kmsKeyIdentifier is not supported"):
        await rig.call(operation, {**params, "kmsKeyIdentifier": key})
    assert (await rig.call("ListMicrovms"))["items"] == []
    assert [i["name"] for i in (await rig.call("ListMicrovmImages"))["items"]] == ["web"]


async def test_launch_failure_terminates_with_reason(rig: Rig) -> None:
    await rig.image()
    rig.host.fail["launch"] = VmmError("QEMU exited with status 1")
    vm = await rig.run()
    assert vm["state"] == "TERMINATED"
    assert vm["stateReason"] == "LaunchFailed:QEMU_exited_with_status_1"
    assert "terminatedAt" in vm


async def test_run_of_image_without_active_version_is_a_conflict(rig: Rig) -> None:
    rig.builder.gates.hold("build")
    await rig.call(
        "CreateMicrovmImage",
        {
            "name": "web",
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
            "buildRoleArn": "arn:aws:iam::123456789012:role/build",
            "codeArtifact": {"uri": "file:///tmp/app.zip"},
        },
    )
    with pytest.raises(ConflictError, match="no ACTIVE version"):
        await rig.call("RunMicrovm", {"imageIdentifier": "web"})
    rig.builder.gates.release("build")


async def test_run_of_unknown_image_or_version_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("RunMicrovm", {"imageIdentifier": "ghost"})
    await rig.image()
    with pytest.raises(NotFoundError):
        await rig.call("RunMicrovm", {"imageIdentifier": "web", "imageVersion": "3"})


async def test_run_of_managed_image_is_refused(rig: Rig) -> None:
    with pytest.raises(ValidationError):
        await rig.call(
            "RunMicrovm", {"imageIdentifier": "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"}
        )


async def test_run_of_inactive_version_is_a_conflict(rig: Rig) -> None:
    await rig.image()
    await rig.call(
        "UpdateMicrovmImageVersion",
        {"imageIdentifier": "web", "imageVersion": "1", "status": "INACTIVE"},
    )
    with pytest.raises(ConflictError):
        await rig.call("RunMicrovm", {"imageIdentifier": "web", "imageVersion": "1"})


async def test_run_sees_the_version_made_inactive_and_the_image_deleted_after_a_run(
    rig: Rig,
) -> None:
    """The rows an earlier run read (and the store kept in memory) do not outlive a change."""
    await rig.image()
    vm = await rig.call("RunMicrovm", {"imageIdentifier": "web", "imageVersion": "1"})
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm["microvmId"]})
    await rig.call(
        "UpdateMicrovmImageVersion",
        {"imageIdentifier": "web", "imageVersion": "1", "status": "INACTIVE"},
    )
    with pytest.raises(ConflictError):
        await rig.call("RunMicrovm", {"imageIdentifier": "web", "imageVersion": "1"})
    await rig.settle()
    await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    with pytest.raises(NotFoundError):
        await rig.call("RunMicrovm", {"imageIdentifier": "web", "imageVersion": "1"})


async def test_run_with_same_client_token_and_body_returns_same_vm(rig: Rig) -> None:
    await rig.image()
    params = {"imageIdentifier": "web", "clientToken": "run-1"}
    first = await rig.call("RunMicrovm", params)
    second = await rig.call("RunMicrovm", params)
    await rig.settle()
    assert first["microvmId"] == second["microvmId"]
    assert rig.host.count("launch") == 1


async def test_run_with_same_client_token_other_body_is_a_conflict(rig: Rig) -> None:
    await rig.image()
    await rig.call("RunMicrovm", {"imageIdentifier": "web", "clientToken": "run-1"})
    with pytest.raises(ConflictError, match="clientToken"):
        await rig.call(
            "RunMicrovm",
            {"imageIdentifier": "web", "clientToken": "run-1", "maximumDurationInSeconds": 60},
        )


async def test_get_of_another_accounts_vm_is_not_found(rig: Rig) -> None:
    await rig.image()
    vm = await rig.run()
    other = Caller("AKIDOTHER", "210987654321", "us-east-1")
    with pytest.raises(NotFoundError):
        await rig.call("GetMicrovm", {"microvmIdentifier": vm["microvmId"]}, caller=other)


async def test_list_microvms_pages_and_filters(rig: Rig) -> None:
    await rig.image()
    await rig.image("api")
    web = [(await rig.run())["microvmId"] for _ in range(3)]
    await rig.run("api")
    seen: list[str] = []
    token = None
    while True:
        params: dict[str, Any] = {"imageIdentifier": "web", "maxResults": 2}
        if token:
            params["nextToken"] = token
        page = await rig.call("ListMicrovms", params)
        seen += [i["microvmId"] for i in page["items"]]
        token = page.get("nextToken")
        if not token:
            break
    everything = await rig.call("ListMicrovms")
    assert seen == web
    assert len(everything["items"]) == 4


async def test_suspend_then_resume_round_trip(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    suspended = await rig.state(vm_id)
    await rig.call("ResumeMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    assert (suspended, await rig.state(vm_id)) == ("SUSPENDED", "RUNNING")
    assert rig.host.is_running(vm_id)


async def test_suspend_shows_suspending_while_the_snapshot_is_taken(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    rig.host.gates.hold("suspend")
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    assert await rig.state(vm_id) == "SUSPENDING"
    rig.host.gates.release("suspend")
    await rig.settle()
    assert await rig.state(vm_id) == "SUSPENDED"


async def test_failed_suspend_leaves_the_vm_running_with_reason(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    rig.host.fail["suspend"] = VmmError("disk full")
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (vm["state"], vm["stateReason"]) == ("RUNNING", "SuspendFailed:disk_full")


async def test_failed_resume_terminates_with_reason(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    rig.host.fail["resume"] = VmmError("snapshot corrupt")
    await rig.call("ResumeMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (vm["state"], vm["stateReason"]) == ("TERMINATED", "ResumeFailed:snapshot_corrupt")


async def _vm_in(rig: Rig, state: str) -> str:
    """A VM brought to ``state`` (transitional states are held open by the fake host)."""
    if state == "PENDING":
        rig.host.gates.hold("launch")
        return str((await rig.call("RunMicrovm", {"imageIdentifier": "web"}))["microvmId"])
    vm_id = str((await rig.run())["microvmId"])
    if state == "RUNNING":
        return vm_id
    if state in ("SUSPENDING", "SUSPENDED"):
        if state == "SUSPENDING":
            rig.host.gates.hold("suspend")
        await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
        if state == "SUSPENDED":
            await rig.settle()
        return vm_id
    if state == "TERMINATING":
        rig.host.gates.hold("terminate")
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm_id})
    if state == "TERMINATED":
        await rig.settle()
    return vm_id


TABLE = [
    # (state, operation, expected: "ok" or the error type)
    ("PENDING", "SuspendMicrovm", ConflictError),
    ("PENDING", "ResumeMicrovm", ConflictError),
    ("PENDING", "TerminateMicrovm", "ok"),
    ("RUNNING", "SuspendMicrovm", "ok"),
    ("RUNNING", "ResumeMicrovm", ConflictError),
    ("RUNNING", "TerminateMicrovm", "ok"),
    ("SUSPENDING", "SuspendMicrovm", "ok"),
    ("SUSPENDING", "ResumeMicrovm", "ok"),
    ("SUSPENDING", "TerminateMicrovm", "ok"),
    ("SUSPENDED", "SuspendMicrovm", ConflictError),
    ("SUSPENDED", "ResumeMicrovm", "ok"),
    ("SUSPENDED", "TerminateMicrovm", "ok"),
    ("TERMINATING", "SuspendMicrovm", ConflictError),
    ("TERMINATING", "ResumeMicrovm", ConflictError),
    ("TERMINATING", "TerminateMicrovm", "ok"),
    ("TERMINATED", "SuspendMicrovm", ConflictError),
    ("TERMINATED", "ResumeMicrovm", ConflictError),
    ("TERMINATED", "TerminateMicrovm", "ok"),
]


@pytest.mark.parametrize(("state", "operation", "expected"), TABLE)
async def test_state_machine_table(rig: Rig, state: str, operation: str, expected: Any) -> None:
    await rig.image()
    vm_id = await _vm_in(rig, state)
    assert await rig.state(vm_id) == state
    if expected == "ok":
        assert await rig.call(operation, {"microvmIdentifier": vm_id}) == {}
    else:
        with pytest.raises(expected):
            await rig.call(operation, {"microvmIdentifier": vm_id})
    for gate in ("launch", "suspend", "terminate"):
        rig.host.gates.release(gate)
    await rig.settle()


@pytest.mark.parametrize("state", ["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED"])
async def test_terminate_from_any_live_state_leaves_nothing_running(rig: Rig, state: str) -> None:
    await rig.image()
    vm_id = await _vm_in(rig, state)
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm_id})
    for gate in ("launch", "suspend"):
        rig.host.gates.release(gate)
    await rig.settle()
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (vm["state"], vm["stateReason"]) == ("TERMINATED", "TerminatedByUser")
    assert not rig.host.is_running(vm_id)
    assert vm_id not in rig.host.suspended


async def test_terminate_unknown_vm_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("TerminateMicrovm", {"microvmIdentifier": "mvm-00000000000000000000"})


async def test_vm_exit_reported_by_host_terminates_with_reason(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    await rig.ops.vm_exited(vm_id, "QEMU killed by signal 9")
    vm = await rig.call("GetMicrovm", {"microvmIdentifier": vm_id})
    assert (vm["state"], vm["stateReason"]) == ("TERMINATED", "VmExited:QEMU_killed_by_signal_9")


async def test_auth_token_carries_ports_and_expiry(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    out = await rig.call(
        "CreateMicrovmAuthToken",
        {
            "microvmIdentifier": vm_id,
            "expirationInMinutes": 30,
            "allowedPorts": [{"port": 8080}, {"range": {"startPort": 9000, "endPort": 9010}}],
        },
    )
    assert out["authToken"] == {"X-aws-proxy-auth": "fake-endpoint-token-1"}
    assert rig.tokens.issued == [
        (vm_id, "endpoint", PortGrant(ranges=((8080, 8080), (9000, 9010))), 30)
    ]


@pytest.mark.parametrize(
    ("minutes", "ports"),
    [
        (61, [{"port": 8080}]),
        (5, []),
        (5, [{"range": {"startPort": 9010, "endPort": 9000}}]),
        (5, [{"port": 1, "allPorts": {}}]),
    ],
)
async def test_invalid_auth_token_requests_are_refused(
    rig: Rig, minutes: int, ports: list[dict[str, Any]]
) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    with pytest.raises(ValidationError):
        await rig.call(
            "CreateMicrovmAuthToken",
            {"microvmIdentifier": vm_id, "expirationInMinutes": minutes, "allowedPorts": ports},
        )


async def test_shell_token_needs_shell_or_all_ingress(rig: Rig) -> None:
    await rig.image()
    http_only = (await rig.run())["microvmId"]
    with_all = (await rig.run(ingressNetworkConnectors=[ALL_INGRESS]))["microvmId"]
    with pytest.raises(ValidationError, match="SHELL_INGRESS"):
        await rig.call(
            "CreateMicrovmShellAuthToken",
            {"microvmIdentifier": http_only, "expirationInMinutes": 5},
        )
    out = await rig.call(
        "CreateMicrovmShellAuthToken", {"microvmIdentifier": with_all, "expirationInMinutes": 5}
    )
    assert out["authToken"]["X-aws-proxy-auth"] == "fake-shell-token-1"
    assert rig.tokens.issued[0][1:3] == ("shell", PortGrant(ranges=((8022, 8022),)))


async def test_endpoint_token_needs_http_ingress(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run(ingressNetworkConnectors=["SHELL_INGRESS"]))["microvmId"]
    with pytest.raises(ValidationError, match="HTTP_INGRESS"):
        await rig.call(
            "CreateMicrovmAuthToken",
            {"microvmIdentifier": vm_id, "expirationInMinutes": 5, "allowedPorts": [{"port": 1}]},
        )


async def test_token_for_terminated_vm_is_a_conflict(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    with pytest.raises(ConflictError):
        await rig.call(
            "CreateMicrovmAuthToken",
            {"microvmIdentifier": vm_id, "expirationInMinutes": 5, "allowedPorts": [{"port": 1}]},
        )


async def _limited(tmp_path: Path, **limits: Any) -> Rig:
    r = await make_rig(tmp_path, limits=CoreLimits(**{"rate_limits": {}, **limits}))
    await r.image(resources=[{"minimumMemoryInMiB": 1024}])
    return r


async def test_vm_count_quota(tmp_path: Path) -> None:
    r = await _limited(tmp_path, max_microvms=2)
    try:
        await r.run()
        await r.run()
        with pytest.raises(QuotaExceededError):
            await r.call("RunMicrovm", {"imageIdentifier": "web"})
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_memory_quota(tmp_path: Path) -> None:
    r = await _limited(tmp_path, max_total_memory_mib=2048)
    try:
        await r.run()
        await r.run()
        with pytest.raises(QuotaExceededError, match="memory"):
            await r.call("RunMicrovm", {"imageIdentifier": "web"})
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_capacity_is_never_overcommitted_and_freed_by_terminate(tmp_path: Path) -> None:
    r = await _limited(tmp_path, host_memory_budget_mib=2048)
    try:
        first = (await r.run())["microvmId"]
        await r.run()
        with pytest.raises(InsufficientCapacityError):
            await r.call("RunMicrovm", {"imageIdentifier": "web"})
        await r.call("TerminateMicrovm", {"microvmIdentifier": first})
        await r.settle()
        assert (await r.run())["state"] == "RUNNING"
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_suspended_vms_hold_no_capacity_but_need_it_to_resume(tmp_path: Path) -> None:
    r = await _limited(tmp_path, host_memory_budget_mib=1024)
    try:
        first = (await r.run())["microvmId"]
        await r.call("SuspendMicrovm", {"microvmIdentifier": first})
        await r.settle()
        await r.run()
        with pytest.raises(InsufficientCapacityError):
            await r.call("ResumeMicrovm", {"microvmIdentifier": first})
        assert await r.state(first) == "SUSPENDED"
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_throttling_refuses_past_burst_and_refills_with_time(tmp_path: Path) -> None:
    r = await make_rig(tmp_path, limits=CoreLimits(rate_limits={"GetMicrovm": RateLimit(1.0, 2)}))
    try:
        await r.image()
        vm_id = (await r.run())["microvmId"]

        async def three_gets() -> None:
            for _ in range(3):
                await r.ops.invoke("GetMicrovm", {"microvmIdentifier": vm_id}, r.caller)

        with pytest.raises(ThrottledError) as caught:
            await three_gets()
        assert caught.value.retry_after >= 1
        r.clock.advance(1.0)
        out = await r.ops.invoke("GetMicrovm", {"microvmIdentifier": vm_id}, r.caller)
        assert out["microvmId"] == vm_id
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_running_time_and_snapshot_bytes_are_metered(rig: Rig) -> None:
    await rig.image(resources=[{"minimumMemoryInMiB": 2048}])
    vm_id = (await rig.run())["microvmId"]
    rig.clock.advance(100)
    await rig.call("SuspendMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    await rig.call("ResumeMicrovm", {"microvmIdentifier": vm_id})
    await rig.settle()
    usage = await rig.repo.get_usage(vm_id)
    assert (usage.vcpu_seconds, usage.gib_seconds) == (100.0, 200.0)
    assert usage.snapshot_bytes_written == usage.snapshot_bytes_read == rig.host.snapshot_bytes


async def test_app_logs_need_an_existing_vm(rig: Rig) -> None:
    await rig.image()
    vm_id = (await rig.run())["microvmId"]
    rig.app_logs.logs = {vm_id: ["hello"]}  # type: ignore[misc]
    assert [line async for line in await rig.ops.app_log_lines(vm_id)] == ["hello"]
    with pytest.raises(NotFoundError):
        await rig.ops.app_log_lines("mvm-00000000000000000000")


async def test_every_operation_is_served(rig: Rig) -> None:
    from embervm.model import OPERATION_NAMES

    assert set(rig.ops._handlers) == set(OPERATION_NAMES)


async def test_an_operation_the_model_gained_without_a_handler_stops_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embervm.core.operations as operations_module

    grown = (*operations_module.OPERATION_NAMES, "ForkMicrovm")
    monkeypatch.setattr(operations_module, "OPERATION_NAMES", grown)
    settings = Settings(data_dir=tmp_path / "data")
    repo = await open_repository(settings.effective_database_url)
    try:
        with pytest.raises(InternalError, match="no handler for ForkMicrovm"):
            operations_module.Operations(
                settings=settings,
                repository=repo,
                host=FakeHost(),
                builder=FakeBuilder(settings.images_dir),
                page_key=b"k" * 32,
            )
    finally:
        await repo.close()

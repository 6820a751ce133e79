"""Image operations: builds in the background, versions, deletes, paging, tags, idempotency."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.framework.core_unit_harness import ACCOUNT, BASE, Rig, image_params, make_rig

from embervm.core import Caller, CoreLimits
from embervm.errors import ConflictError, NotFoundError, QuotaExceededError, ValidationError

ARN = f"arn:aws:lambda:us-east-1:{ACCOUNT}:microvm-image:web"


async def test_create_returns_creating_then_build_makes_it_created(rig: Rig) -> None:
    rig.builder.gates.hold("build")
    out = await rig.call("CreateMicrovmImage", image_params())
    assert (out["state"], out["imageVersion"], out["imageArn"]) == ("CREATING", "1", ARN)
    rig.builder.gates.release("build")
    await rig.settle()
    image = await rig.call("GetMicrovmImage", {"imageIdentifier": "web"})
    assert (image["state"], image["latestActiveImageVersion"]) == ("CREATED", "1")


async def test_successful_build_makes_version_active_with_snapshot_sizes(rig: Rig) -> None:
    await rig.image(resources=[{"minimumMemoryInMiB": 2048}])
    version = await rig.call(
        "GetMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "1"}
    )
    builds = await rig.call(
        "ListMicrovmImageBuilds", {"imageIdentifier": "web", "imageVersion": "1"}
    )
    build = await rig.call(
        "GetMicrovmImageBuild",
        {"imageIdentifier": "web", "imageVersion": "1", "buildId": builds["items"][0]["buildId"]},
    )
    assert (version["state"], version["status"]) == ("SUCCESSFUL", "ACTIVE")
    assert build["buildState"] == "SUCCESSFUL"
    assert build["snapshotBuild"]["memorySnapshotSizeInBytes"] == 2048 * 1024 * 1024


async def test_build_job_carries_version_config_and_memory(rig: Rig) -> None:
    await rig.image(environmentVariables={"A": "1"}, resources=[{"minimumMemoryInMiB": 512}])
    job = rig.builder.jobs[0]
    assert (job.version, job.memory_mib, job.request["environmentVariables"]) == (
        "1",
        512,
        {"A": "1"},
    )


async def test_failed_build_reports_reason_everywhere(rig: Rig) -> None:
    rig.builder.failures.append("RUN pip install failed (exit 1)")
    image = await rig.image()
    version = await rig.call(
        "GetMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "1"}
    )
    assert (image["state"], image["latestFailedImageVersion"]) == ("CREATE_FAILED", "1")
    assert "latestActiveImageVersion" not in image
    assert (version["state"], version["status"]) == ("FAILED", "INACTIVE")
    assert version["stateReason"] == "RUN pip install failed (exit 1)"


async def test_create_with_taken_name_is_a_conflict(rig: Rig) -> None:
    await rig.image()
    with pytest.raises(ConflictError):
        await rig.call("CreateMicrovmImage", image_params())


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"baseImageArn": "arn:aws:lambda:us-east-1:123456789012:microvm-image:x"}, "managed"),
        ({"baseImageVersion": "7"}, "baseImageVersion"),
        ({"codeArtifact": {"uri": "ftp://host/app.zip"}}, "codeArtifact"),
        ({"cpuConfigurations": [{"architecture": "ARM_64"}]}, "X86_64"),
        ({"resources": [{"minimumMemoryInMiB": 100}]}, "minimumMemoryInMiB"),
        ({"egressNetworkConnectors": ["vpc-123"]}, "egressNetworkConnectors"),
    ],
)
async def test_create_refuses_invalid_configuration(
    rig: Rig, extra: dict[str, object], needle: str
) -> None:
    with pytest.raises(ValidationError, match=needle):
        await rig.call("CreateMicrovmImage", image_params(**extra))


async def test_update_adds_a_version_and_moves_latest_active(rig: Rig) -> None:
    await rig.image()
    out = await rig.call("UpdateMicrovmImage", {"imageIdentifier": "web", **_update()})
    assert (out["state"], out["imageVersion"]) == ("UPDATING", "2")
    await rig.settle()
    image = await rig.call("GetMicrovmImage", {"imageIdentifier": ARN})
    assert (image["state"], image["latestActiveImageVersion"]) == ("UPDATED", "2")


def _update() -> dict[str, object]:
    params = image_params()
    del params["name"]
    return params


async def test_update_while_building_is_a_conflict(rig: Rig) -> None:
    rig.builder.gates.hold("build")
    await rig.call("CreateMicrovmImage", image_params())
    with pytest.raises(ConflictError):
        await rig.call("UpdateMicrovmImage", {"imageIdentifier": "web", **_update()})
    rig.builder.gates.release("build")


async def test_failed_update_keeps_previous_active_version(rig: Rig) -> None:
    await rig.image()
    rig.builder.failures.append("broken Dockerfile")
    await rig.call("UpdateMicrovmImage", {"imageIdentifier": "web", **_update()})
    await rig.settle()
    image = await rig.call("GetMicrovmImage", {"imageIdentifier": "web"})
    assert (image["state"], image["latestActiveImageVersion"]) == ("UPDATE_FAILED", "1")
    assert image["latestFailedImageVersion"] == "2"


async def test_unknown_image_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("GetMicrovmImage", {"imageIdentifier": "nope"})


async def test_image_of_another_account_is_not_found(rig: Rig) -> None:
    await rig.image()
    other = Caller("AKIDOTHER", "210987654321", "us-east-1")
    with pytest.raises(NotFoundError):
        await rig.call("GetMicrovmImage", {"imageIdentifier": ARN}, caller=other)


async def test_list_images_pages_through_everything_once(rig: Rig) -> None:
    for i in range(5):
        await rig.call("CreateMicrovmImage", image_params(f"img{i}"))
    seen: list[str] = []
    token = None
    while True:
        params: dict[str, object] = {"maxResults": 2}
        if token:
            params["nextToken"] = token
        page = await rig.call("ListMicrovmImages", params)
        seen += [item["name"] for item in page["items"]]
        token = page.get("nextToken")
        if not token:
            break
    assert seen == [f"img{i}" for i in range(5)]


async def test_list_images_name_filter(rig: Rig) -> None:
    for name in ("api-a", "web-b", "api-c"):
        await rig.call("CreateMicrovmImage", image_params(name))
    page = await rig.call("ListMicrovmImages", {"nameFilter": "api"})
    assert [i["name"] for i in page["items"]] == ["api-a", "api-c"]


async def test_tampered_next_token_is_a_validation_error(rig: Rig) -> None:
    for i in range(3):
        await rig.call("CreateMicrovmImage", image_params(f"img{i}"))
    token = (await rig.call("ListMicrovmImages", {"maxResults": 1}))["nextToken"]
    payload, mac = token.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac
    with pytest.raises(ValidationError):
        await rig.call("ListMicrovmImages", {"maxResults": 1, "nextToken": forged})


async def test_next_token_of_another_listing_is_refused(rig: Rig) -> None:
    for i in range(3):
        await rig.call("CreateMicrovmImage", image_params(f"img{i}"))
    token = (await rig.call("ListMicrovmImages", {"maxResults": 1}))["nextToken"]
    with pytest.raises(ValidationError):
        await rig.call("ListMicrovms", {"nextToken": token})


async def test_garbage_next_token_is_a_validation_error(rig: Rig) -> None:
    with pytest.raises(ValidationError):
        await rig.call("ListMicrovmImages", {"nextToken": "not-a-token"})


async def test_delete_is_idempotent_and_hides_the_image(rig: Rig) -> None:
    await rig.image()
    first = await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    second = await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    assert first["state"] == second["state"] == "DELETED"
    with pytest.raises(NotFoundError):
        await rig.call("GetMicrovmImage", {"imageIdentifier": "web"})
    await rig.settle()
    assert rig.builder.discarded == [("web", None)]


async def test_delete_of_unknown_image_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("DeleteMicrovmImage", {"imageIdentifier": "ghost"})


async def test_delete_image_used_by_a_vm_is_a_conflict(rig: Rig) -> None:
    await rig.image()
    await rig.run()
    with pytest.raises(ConflictError):
        await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})


async def test_delete_image_after_its_vms_terminated(rig: Rig) -> None:
    await rig.image()
    vm = await rig.run()
    await rig.call("TerminateMicrovm", {"microvmIdentifier": vm["microvmId"]})
    await rig.settle()
    out = await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    assert out["state"] == "DELETED"


async def test_delete_while_building_is_a_conflict(rig: Rig) -> None:
    rig.builder.gates.hold("build")
    await rig.call("CreateMicrovmImage", image_params())
    with pytest.raises(ConflictError):
        await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    rig.builder.gates.release("build")


async def test_name_can_be_reused_after_delete(rig: Rig) -> None:
    await rig.image()
    await rig.call("DeleteMicrovmImage", {"imageIdentifier": "web"})
    image = await rig.image()
    versions = await rig.call("ListMicrovmImageVersions", {"imageIdentifier": "web"})
    assert image["latestActiveImageVersion"] == "1"
    assert [v["imageVersion"] for v in versions["items"]] == ["1"]


async def test_inactive_latest_version_falls_back_to_previous(rig: Rig) -> None:
    await rig.image()
    await rig.call("UpdateMicrovmImage", {"imageIdentifier": "web", **_update()})
    await rig.settle()
    out = await rig.call(
        "UpdateMicrovmImageVersion",
        {"imageIdentifier": "web", "imageVersion": "2", "status": "INACTIVE"},
    )
    image = await rig.call("GetMicrovmImage", {"imageIdentifier": "web"})
    assert out["status"] == "INACTIVE"
    assert image["latestActiveImageVersion"] == "1"


async def test_failed_version_cannot_be_activated(rig: Rig) -> None:
    rig.builder.failures.append("nope")
    await rig.image()
    with pytest.raises(ConflictError):
        await rig.call(
            "UpdateMicrovmImageVersion",
            {"imageIdentifier": "web", "imageVersion": "1", "status": "ACTIVE"},
        )


async def test_delete_version_is_idempotent_and_refused_while_used(rig: Rig) -> None:
    await rig.image()
    await rig.call("UpdateMicrovmImage", {"imageIdentifier": "web", **_update()})
    await rig.settle()
    await rig.run(imageVersion="2")
    with pytest.raises(ConflictError):
        await rig.call("DeleteMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "2"})
    for _ in range(2):
        out = await rig.call(
            "DeleteMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "1"}
        )
        assert out["state"] == "DELETED"
    versions = await rig.call("ListMicrovmImageVersions", {"imageIdentifier": "web"})
    assert [v["imageVersion"] for v in versions["items"]] == ["2"]


async def test_unknown_version_and_build_are_not_found(rig: Rig) -> None:
    await rig.image()
    with pytest.raises(NotFoundError):
        await rig.call("GetMicrovmImageVersion", {"imageIdentifier": "web", "imageVersion": "9"})
    with pytest.raises(NotFoundError):
        await rig.call(
            "GetMicrovmImageBuild",
            {"imageIdentifier": "web", "imageVersion": "1", "buildId": "no-such-build"},
        )


async def test_list_builds_filters_by_architecture(rig: Rig) -> None:
    await rig.image()
    x86 = await rig.call(
        "ListMicrovmImageBuilds",
        {"imageIdentifier": "web", "imageVersion": "1", "architecture": "X86_64"},
    )
    arm = await rig.call(
        "ListMicrovmImageBuilds",
        {"imageIdentifier": "web", "imageVersion": "1", "architecture": "ARM_64"},
    )
    assert (len(x86["items"]), len(arm["items"])) == (1, 0)


async def test_managed_images_list_debian12(rig: Rig) -> None:
    images = await rig.call("ListManagedMicrovmImages")
    versions = await rig.call("ListManagedMicrovmImageVersions", {"imageIdentifier": BASE})
    assert [i["imageArn"] for i in images["items"]] == [BASE]
    assert [(v["imageVersion"], v["status"]) for v in versions["items"]] == [("1", "AVAILABLE")]


async def test_unknown_managed_image_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("ListManagedMicrovmImageVersions", {"imageIdentifier": "centos"})


async def test_tags_round_trip(rig: Rig) -> None:
    await rig.image(tags={"team": "a"})
    await rig.call("TagResource", {"Resource": ARN, "Tags": {"env": "prod", "team": "b"}})
    await rig.call("UntagResource", {"Resource": ARN, "TagKeys": ["env"]})
    tags = await rig.call("ListTags", {"Resource": ARN})
    image = await rig.call("GetMicrovmImage", {"imageIdentifier": "web"})
    assert tags["Tags"] == image["tags"] == {"team": "b"}


async def test_tagging_unknown_or_foreign_resource_is_not_found(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        await rig.call("TagResource", {"Resource": ARN, "Tags": {"a": "b"}})
    foreign = "arn:aws:lambda:us-east-1:999999999999:microvm-image:web"
    with pytest.raises(NotFoundError):
        await rig.call("ListTags", {"Resource": foreign})


async def test_create_with_same_client_token_and_body_replays(rig: Rig) -> None:
    params = image_params(clientToken="tok-1")
    first = await rig.call("CreateMicrovmImage", params)
    second = await rig.call("CreateMicrovmImage", params)
    await rig.settle()
    assert (first["imageArn"], first["imageVersion"]) == (
        second["imageArn"],
        second["imageVersion"],
    )
    assert len(rig.builder.jobs) == 1


async def test_create_with_same_client_token_other_body_is_a_conflict(rig: Rig) -> None:
    await rig.call("CreateMicrovmImage", image_params(clientToken="tok-1"))
    with pytest.raises(ConflictError, match="clientToken"):
        await rig.call("CreateMicrovmImage", image_params("other", clientToken="tok-1"))


async def test_update_with_same_client_token_replays(rig: Rig) -> None:
    await rig.image()
    params = {"imageIdentifier": "web", "clientToken": "u-1", **_update()}
    first = await rig.call("UpdateMicrovmImage", params)
    await rig.settle()
    second = await rig.call("UpdateMicrovmImage", params)
    assert first["imageVersion"] == second["imageVersion"] == "2"
    assert len(rig.builder.jobs) == 2


async def test_image_quota(tmp_path: Path) -> None:
    r = await make_rig(tmp_path, limits=CoreLimits(max_images=2, rate_limits={}))
    try:
        await r.call("CreateMicrovmImage", image_params("a"))
        await r.call("CreateMicrovmImage", image_params("b"))
        with pytest.raises(QuotaExceededError):
            await r.call("CreateMicrovmImage", image_params("c"))
    finally:
        await r.ops.stop()
        await r.repo.close()


async def test_build_logs_need_an_existing_version(rig: Rig) -> None:
    await rig.image()
    rig.build_logs.logs = {("web", "1"): ['{"message": "hi"}']}  # type: ignore[misc]
    lines = [line async for line in await rig.ops.build_log_lines("web", "1")]
    assert lines == ['{"message": "hi"}']
    with pytest.raises(NotFoundError):
        await rig.ops.build_log_lines("web", "5")

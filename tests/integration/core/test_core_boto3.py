"""Every operation and paginator through boto3 against the real API, core and store."""

from __future__ import annotations

from typing import Any

import botocore.session
import pytest
from botocore import xform_name
from botocore.exceptions import ClientError
from tests.framework.core_live_server import (
    ACCOUNT,
    BASE,
    CONNECTOR,
    REGION,
    ROLE,
    CoreServer,
    image,
    wait,
)

from embervm.model import validate_output


def checked(operation: str, response: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in response.items() if k != "ResponseMetadata"}
    assert validate_output(operation, _wire(body)) == [], (operation, body)
    return body


def _wire(value: Any) -> Any:
    """boto3 parses timestamps into datetimes; the model validator checks wire values."""
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return value


def test_all_24_operations_answer_in_their_model_shapes(api: CoreServer) -> None:
    c = api.client()
    created = checked("CreateMicrovmImage", c.create_microvm_image(
        name="ops", baseImageArn=BASE, buildRoleArn=ROLE, tags={"team": "a"},
        codeArtifact={"uri": "file:///tmp/app.zip"}))  # fmt: skip
    arn = created["imageArn"]
    assert arn == f"arn:aws:lambda:{REGION}:{ACCOUNT}:microvm-image:ops"
    wait(lambda: c.get_microvm_image(imageIdentifier="ops"), lambda i: i["state"] == "CREATED",
         "build")  # fmt: skip
    checked("GetMicrovmImage", c.get_microvm_image(imageIdentifier="ops"))
    checked("ListMicrovmImages", c.list_microvm_images())
    updated = checked("UpdateMicrovmImage", c.update_microvm_image(
        imageIdentifier="ops", baseImageArn=BASE, buildRoleArn=ROLE,
        codeArtifact={"uri": "file:///tmp/app2.zip"}))  # fmt: skip
    version = str(updated["imageVersion"])
    wait(lambda: c.get_microvm_image(imageIdentifier="ops"), lambda i: i["state"] == "UPDATED",
         "rebuild")  # fmt: skip
    checked("GetMicrovmImageVersion",
            c.get_microvm_image_version(imageIdentifier="ops", imageVersion=version))  # fmt: skip
    checked("ListMicrovmImageVersions", c.list_microvm_image_versions(imageIdentifier="ops"))
    listed = c.list_microvm_image_builds(imageIdentifier="ops", imageVersion=version)
    builds = checked("ListMicrovmImageBuilds", listed)
    build_id = builds["items"][0]["buildId"]
    checked("GetMicrovmImageBuild", c.get_microvm_image_build(
        imageIdentifier="ops", imageVersion=version, buildId=build_id))  # fmt: skip
    checked("ListManagedMicrovmImages", c.list_managed_microvm_images())
    checked("ListManagedMicrovmImageVersions",
            c.list_managed_microvm_image_versions(imageIdentifier="debian12"))  # fmt: skip
    checked("TagResource", c.tag_resource(Resource=arn, Tags={"env": "test"}))
    assert checked("ListTags", c.list_tags(Resource=arn))["Tags"] == {"team": "a", "env": "test"}
    checked("UntagResource", c.untag_resource(Resource=arn, TagKeys=["team"]))
    assert c.list_tags(Resource=arn)["Tags"] == {"env": "test"}

    vm = checked("RunMicrovm", c.run_microvm(
        imageIdentifier="ops", ingressNetworkConnectors=[CONNECTOR.format("ALL_INGRESS")],
        idlePolicy={"maxIdleDurationSeconds": 600, "suspendedDurationSeconds": 600,
                    "autoResumeEnabled": True}))  # fmt: skip
    vm_id = vm["microvmId"]
    wait(lambda: c.get_microvm(microvmIdentifier=vm_id), lambda v: v["state"] == "RUNNING", "run")
    checked("GetMicrovm", c.get_microvm(microvmIdentifier=vm_id))
    checked("ListMicrovms", c.list_microvms())
    token = checked("CreateMicrovmAuthToken", c.create_microvm_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=5, allowedPorts=[{"port": 8080}]))  # fmt: skip
    assert set(token["authToken"]) == {"X-aws-proxy-auth"}
    with pytest.raises(ClientError) as too_long:
        c.create_microvm_auth_token(microvmIdentifier=vm_id, expirationInMinutes=61,
                                    allowedPorts=[{"port": 1}])  # fmt: skip
    assert too_long.value.response["Error"]["Code"] == "ValidationException"
    checked("CreateMicrovmShellAuthToken", c.create_microvm_shell_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=5))  # fmt: skip
    checked("SuspendMicrovm", c.suspend_microvm(microvmIdentifier=vm_id))
    wait(lambda: c.get_microvm(microvmIdentifier=vm_id), lambda v: v["state"] == "SUSPENDED",
         "suspend")  # fmt: skip
    checked("ResumeMicrovm", c.resume_microvm(microvmIdentifier=vm_id))
    wait(lambda: c.get_microvm(microvmIdentifier=vm_id), lambda v: v["state"] == "RUNNING",
         "resume")  # fmt: skip
    checked("TerminateMicrovm", c.terminate_microvm(microvmIdentifier=vm_id))
    checked("TerminateMicrovm", c.terminate_microvm(microvmIdentifier=vm_id))  # idempotent
    checked("UpdateMicrovmImageVersion", c.update_microvm_image_version(
        imageIdentifier="ops", imageVersion="1", status="INACTIVE"))  # fmt: skip
    checked("DeleteMicrovmImageVersion",
            c.delete_microvm_image_version(imageIdentifier="ops", imageVersion="1"))  # fmt: skip
    checked("DeleteMicrovmImage", c.delete_microvm_image(imageIdentifier="ops"))
    checked("DeleteMicrovmImage", c.delete_microvm_image(imageIdentifier="ops"))  # idempotent


def test_every_paginator_walks_every_item_exactly_once(api: CoreServer) -> None:
    c = api.client()
    for n in range(3):
        image(c, f"pages-{n}")
    for _ in range(2):
        c.update_microvm_image(imageIdentifier="pages-0", baseImageArn=BASE, buildRoleArn=ROLE,
                               codeArtifact={"uri": "file:///tmp/app.zip"})  # fmt: skip
        wait(lambda: c.get_microvm_image(imageIdentifier="pages-0"),
             lambda i: i["state"] not in ("UPDATING", "CREATING"), "update")  # fmt: skip
    vms = {c.run_microvm(imageIdentifier="pages-1")["microvmId"] for _ in range(3)}
    walks = {
        "list_microvm_images": ({}, "name"),
        "list_microvm_image_versions": ({"imageIdentifier": "pages-0"}, "imageVersion"),
        "list_microvm_image_builds": ({"imageIdentifier": "pages-0", "imageVersion": "1"},
                                      "buildId"),
        "list_microvms": ({}, "microvmId"),
        "list_managed_microvm_images": ({}, "imageArn"),
        "list_managed_microvm_image_versions": ({"imageIdentifier": "debian12"}, "imageVersion"),
    }  # fmt: skip
    model = botocore.session.get_session().get_paginator_model("lambda-microvms")
    assert set(walks) == {xform_name(op) for op in model._paginator_config}
    for name, (params, key) in walks.items():
        paged = [item[key] for page in c.get_paginator(name).paginate(
            **params, PaginationConfig={"PageSize": 1}) for item in page["items"]]  # fmt: skip
        whole = [item[key] for item in getattr(c, name)(**params, maxResults=50)["items"]]
        assert paged == whole, name
        assert len(set(paged)) == len(paged), name
    assert vms <= {vm["microvmId"] for vm in c.list_microvms(maxResults=50)["items"]}
    for vm_id in vms:
        c.terminate_microvm(microvmIdentifier=vm_id)


def test_next_tokens_are_tamper_proof(api: CoreServer) -> None:
    c = api.client()
    image(c, "tamper-a")
    image(c, "tamper-b")
    token = c.list_microvm_images(maxResults=1)["nextToken"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(c.exceptions.ValidationException):
        c.list_microvm_images(maxResults=1, nextToken=forged)


def test_client_token_makes_run_idempotent(api: CoreServer) -> None:
    c = api.client()
    image(c, "idem")
    first = c.run_microvm(imageIdentifier="idem", clientToken="same-token-1")
    again = c.run_microvm(imageIdentifier="idem", clientToken="same-token-1")
    assert again["microvmId"] == first["microvmId"]
    with pytest.raises(c.exceptions.ConflictException):
        c.run_microvm(imageIdentifier="idem", clientToken="same-token-1",
                      maximumDurationInSeconds=60)  # fmt: skip
    c.terminate_microvm(microvmIdentifier=first["microvmId"])


def test_illegal_transitions_are_conflicts(api: CoreServer) -> None:
    c = api.client()
    image(c, "moves")
    vm_id = c.run_microvm(imageIdentifier="moves")["microvmId"]
    wait(lambda: c.get_microvm(microvmIdentifier=vm_id), lambda v: v["state"] == "RUNNING", "run")
    with pytest.raises(c.exceptions.ConflictException):
        c.resume_microvm(microvmIdentifier=vm_id)
    c.terminate_microvm(microvmIdentifier=vm_id)
    wait(lambda: c.get_microvm(microvmIdentifier=vm_id),
         lambda v: v["state"] == "TERMINATED", "terminate")  # fmt: skip
    with pytest.raises(c.exceptions.ConflictException):
        c.suspend_microvm(microvmIdentifier=vm_id)


def test_unknown_resources_and_bad_input_are_model_errors(api: CoreServer) -> None:
    c = api.client()
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.get_microvm(microvmIdentifier="mvm-00000000000000000000")
    with pytest.raises(c.exceptions.ValidationException) as bad:
        c.run_microvm(imageIdentifier="x", ingressNetworkConnectors=[
            CONNECTOR.format("ALL_INGRESS"), CONNECTOR.format("HTTP_INGRESS")])  # fmt: skip
    assert "ALL_INGRESS" in str(bad.value)

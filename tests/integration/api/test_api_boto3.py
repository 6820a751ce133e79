"""boto3 and the AWS CLI against a real server: every operation, errors, SigV4 failures."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore
import httpx
import pytest
from botocore.config import Config
from tests.framework.api_live_server import LiveApi
from tests.framework.fake_api import signed_request

from embervm.errors import ConflictError, NotFoundError, ThrottledError, ValidationError
from embervm.model import OPERATION_NAMES, example_input, example_output, validate_output

pytestmark = pytest.mark.integration

NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=10)


def _client(live: LiveApi, key: str | None = None, secret: str | None = None) -> Any:
    return boto3.client(
        "lambda-microvms",
        endpoint_url=live.url,
        region_name="us-east-1",
        aws_access_key_id=key or live.credential.access_key_id,
        aws_secret_access_key=secret or live.credential.secret_access_key,
        config=NO_RETRIES,
    )


@pytest.fixture
def live(live_api: LiveApi) -> Iterator[LiveApi]:
    """The module's server with a clean fake and clock for each test."""
    live_api.operations.errors.clear()
    live_api.operations.outputs.clear()
    live_api.operations.calls.clear()
    live_api.clock.offset = 0
    yield live_api
    live_api.clock.offset = 0


@pytest.mark.parametrize("operation", OPERATION_NAMES)
def test_every_operation_works_through_boto3(live: LiveApi, operation: str) -> None:
    client = _client(live)
    params = example_input(operation, full=True)
    response = getattr(client, botocore.xform_name(operation))(**params)
    assert validate_output(operation, response) == []
    call = live.operations.calls[-1]
    assert call.operation == operation
    assert call.params == params


def test_boto3_fills_the_idempotency_token(live: LiveApi) -> None:
    _client(live).run_microvm(imageIdentifier="web")
    assert live.operations.calls[-1].params["clientToken"]


def test_timestamps_arrive_as_datetimes(live: LiveApi) -> None:
    response = _client(live).get_microvm(microvmIdentifier="vm")
    assert response["startedAt"] == example_output("GetMicrovm")["startedAt"]


@pytest.mark.parametrize(
    ("error", "exception"),
    [
        (ConflictError("busy", resourceId="vm", resourceType="microvm"), "ConflictException"),
        (NotFoundError("no such microvm"), "ResourceNotFoundException"),
        (ValidationError("no shell connector"), "ValidationException"),
    ],
)
def test_errors_raise_their_botocore_exception_class(
    live: LiveApi, error: Any, exception: str
) -> None:
    live.operations.errors["SuspendMicrovm"] = error
    client = _client(live)
    with pytest.raises(getattr(client.exceptions, exception)) as caught:
        client.suspend_microvm(microvmIdentifier="vm")
    assert caught.value.response["Error"]["Message"] == error.message


def test_conflict_fields_reach_the_client(live: LiveApi) -> None:
    live.operations.errors["SuspendMicrovm"] = ConflictError(
        "busy", resourceId="vm-9", resourceType="microvm"
    )
    client = _client(live)
    with pytest.raises(client.exceptions.ConflictException) as caught:
        client.suspend_microvm(microvmIdentifier="vm-9")
    assert caught.value.response["resourceId"] == "vm-9"


def test_throttling_raises_throttling_exception_with_retry_after(live: LiveApi) -> None:
    live.operations.errors["ListMicrovms"] = ThrottledError("slow down", retry_after=9)
    client = _client(live)
    with pytest.raises(client.exceptions.ThrottlingException) as caught:
        client.list_microvms()
    assert caught.value.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "9"
    assert caught.value.response["retryAfterSeconds"] == 9


def test_server_side_validation_reaches_boto3_as_validation_exception(live: LiveApi) -> None:
    client = _client(live)
    with pytest.raises(client.exceptions.ValidationException) as caught:
        client.create_microvm_image(**{**example_input("CreateMicrovmImage"), "name": "not ok"})
    message = caught.value.response["Error"]["Message"]
    assert message.startswith("1 validation error detected: Value 'not ok' at 'name'")
    assert live.operations.calls == []


def test_wrong_secret_is_access_denied(live: LiveApi) -> None:
    client = _client(live, secret="x" * 40)
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.get_microvm(microvmIdentifier="vm")
    assert live.operations.calls == []


def test_unknown_key_is_access_denied(live: LiveApi) -> None:
    client = _client(live, key="AKIAUNKNOWNUNKNOWN00")
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.get_microvm(microvmIdentifier="vm")


def test_revoked_key_is_refused_without_restart(live: LiveApi) -> None:
    created = live.store.create("short-lived")
    client = _client(live, created.access_key_id, created.secret_access_key)
    client.get_microvm(microvmIdentifier="vm")
    live.store.revoke(created.access_key_id)
    with pytest.raises(client.exceptions.AccessDeniedException):
        client.get_microvm(microvmIdentifier="vm")


def test_signature_from_a_clock_20_minutes_off_is_access_denied(live: LiveApi) -> None:
    live.clock.offset = 20 * 60
    client = _client(live)
    with pytest.raises(client.exceptions.AccessDeniedException) as caught:
        client.get_microvm(microvmIdentifier="vm")
    assert "Signature expired" in caught.value.response["Error"]["Message"]


def test_signed_20_minutes_ago_is_access_denied(live: LiveApi) -> None:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    request = signed_request(
        "GetMicrovm",
        {"microvmIdentifier": "vm"},
        access_key_id=live.credential.access_key_id,
        secret_access_key=live.credential.secret_access_key,
        endpoint=live.url,
        when=when,
    )
    response = httpx.request(
        request.method, live.url + request.target, headers=request.headers, content=request.body
    )
    assert response.status_code == 403
    assert response.headers["x-amzn-errortype"] == "AccessDeniedException"


def test_tampered_body_is_access_denied(live: LiveApi) -> None:
    request = signed_request(
        "RunMicrovm",
        {"imageIdentifier": "web"},
        access_key_id=live.credential.access_key_id,
        secret_access_key=live.credential.secret_access_key,
        endpoint=live.url,
    )
    tampered = request.body.replace(b"web", b"bad")  # same length: only the signature can tell
    response = httpx.request(
        request.method, live.url + request.target, headers=request.headers, content=tampered
    )
    assert response.status_code == 403
    assert response.headers["x-amzn-errortype"] == "AccessDeniedException"
    assert live.operations.calls == []


def test_ping_needs_no_credentials(live: LiveApi) -> None:
    assert httpx.get(live.url + "/ping").status_code == 200


def _aws(live: LiveApi, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AWS_SHARED_CREDENTIALS_FILE": str(live.data_dir / "credentials"),
        "AWS_CONFIG_FILE": str(live.data_dir / "no-aws-config"),
        "AWS_PROFILE": "embervm",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    aws = Path(sys.executable).with_name("aws")
    return subprocess.run(
        [str(aws), "lambda-microvms", *args, "--endpoint-url", live.url, "--output", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_aws_cli_get_microvm(live: LiveApi) -> None:
    result = _aws(live, "get-microvm", "--microvm-identifier", "vm-1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["microvmId"] == example_output("GetMicrovm")["microvmId"]
    assert live.operations.calls[-1].params == {"microvmIdentifier": "vm-1"}


def test_aws_cli_run_microvm_with_idle_policy(live: LiveApi) -> None:
    result = _aws(
        live,
        "run-microvm",
        "--image-identifier",
        "web",
        "--idle-policy",
        "maxIdleDurationSeconds=300,suspendedDurationSeconds=0,autoResumeEnabled=true",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == example_output("RunMicrovm")["state"]
    params = live.operations.calls[-1].params
    assert params["idlePolicy"] == {
        "maxIdleDurationSeconds": 300,
        "suspendedDurationSeconds": 0,
        "autoResumeEnabled": True,
    }


def test_aws_cli_reports_server_side_validation(live: LiveApi) -> None:
    result = _aws(
        live,
        "run-microvm",
        "--image-identifier",
        "web",
        "--maximum-duration-in-seconds",
        "99999",
    )
    assert result.returncode != 0
    assert "ValidationException" in result.stderr
    assert "maximumDurationInSeconds" in result.stderr

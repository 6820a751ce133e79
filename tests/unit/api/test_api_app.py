"""The app end to end in-process: every operation, error mapping, limits, auth gate."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from botocore.parsers import create_parser
from tests.framework.api_unit_harness import ApiHarness

from embervm.errors import (
    AccessDeniedError,
    ApiError,
    ConflictError,
    InsufficientCapacityError,
    InternalError,
    NotFoundError,
    QuotaExceededError,
    ThrottledError,
    ValidationError,
)
from embervm.model import (
    OPERATION_NAMES,
    example_input,
    example_output,
    operation_model,
    validate_output,
)


def _parse(operation: str, response: httpx.Response) -> dict[str, Any]:
    """The response as botocore's rest-json parser reads it (what boto3 returns)."""
    op = operation_model(operation)
    parsed: dict[str, Any] = create_parser("rest-json").parse(
        {
            "status_code": response.status_code,
            "headers": response.headers,
            "body": response.content,
        },
        op.output_shape if response.status_code < 300 else None,
    )
    return parsed


@pytest.mark.parametrize("operation", OPERATION_NAMES)
async def test_every_operation_answers_a_model_valid_output(
    api: ApiHarness, operation: str
) -> None:
    response = await api.call(operation, example_input(operation, full=True))
    assert response.status_code == operation_model(operation).http["responseCode"]
    parsed = _parse(operation, response)
    assert validate_output(operation, parsed) == []
    assert api.operations.calls[-1].operation == operation
    assert api.operations.calls[-1].params == example_input(operation, full=True)


async def test_outputs_round_trip_through_botocore_including_timestamps(api: ApiHarness) -> None:
    expected = example_output("GetMicrovm", full=True)
    parsed = _parse("GetMicrovm", await api.call("GetMicrovm", {"microvmIdentifier": "vm"}))
    parsed.pop("ResponseMetadata")
    assert parsed == expected


async def test_timestamps_are_epoch_seconds_in_the_body(api: ApiHarness) -> None:
    response = await api.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert response.json()["startedAt"] == 1757419200


async def test_no_content_operations_answer_204_without_body(api: ApiHarness) -> None:
    response = await api.call("TagResource", example_input("TagResource"))
    assert response.status_code == 204
    assert response.content == b""


async def test_caller_comes_from_the_verified_key_and_its_scope_region(api: ApiHarness) -> None:
    await api.call("GetMicrovm", {"microvmIdentifier": "vm"}, region="eu-west-3")
    caller = api.operations.calls[-1].caller
    assert caller.access_key_id == api.credential.access_key_id
    assert caller.region == "eu-west-3"
    assert caller.account_id == "123456789012"


async def test_members_core_adds_beyond_the_shape_are_not_sent(api: ApiHarness) -> None:
    api.operations.outputs["GetMicrovm"] = {**example_output("GetMicrovm"), "hostPid": 4242}
    response = await api.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert "hostPid" not in response.json()


ERRORS: list[tuple[ApiError, str, int]] = [
    (ValidationError("bad"), "ValidationException", 400),
    (AccessDeniedError("no"), "AccessDeniedException", 403),
    (
        NotFoundError("gone", resourceType="microvm", resourceId="vm"),
        "ResourceNotFoundException",
        404,
    ),
    (ConflictError("busy", resourceId="vm"), "ConflictException", 409),
    (QuotaExceededError("full"), "ServiceQuotaExceededException", 402),
    (ThrottledError("slow", retry_after=3), "ThrottlingException", 429),
    (InsufficientCapacityError("host full"), "InsufficientCapacityException", 500),
    (InternalError("oops"), "InternalServerException", 500),
]


@pytest.mark.parametrize(("error", "code", "status"), ERRORS)
async def test_api_errors_map_to_their_model_error_shape(
    api: ApiHarness, error: ApiError, code: str, status: int
) -> None:
    api.operations.errors["RunMicrovm"] = error
    response = await api.call("RunMicrovm", {"imageIdentifier": "img"})
    assert response.status_code == status
    assert response.headers["x-amzn-errortype"] == code
    assert response.json()["message"] == error.message
    parsed = _parse("RunMicrovm", response)
    assert parsed["Error"]["Code"] == code
    assert code in {shape.name for shape in operation_model("RunMicrovm").error_shapes}


async def test_error_fields_of_the_shape_travel_in_the_body(api: ApiHarness) -> None:
    api.operations.errors["GetMicrovm"] = NotFoundError(
        "gone", resourceType="microvm", resourceId="vm-1", internal="x"
    )
    body = (await api.call("GetMicrovm", {"microvmIdentifier": "vm-1"})).json()
    assert body == {"message": "gone", "resourceType": "microvm", "resourceId": "vm-1"}


async def test_throttling_carries_retry_after(api: ApiHarness) -> None:
    api.operations.errors["GetMicrovm"] = ThrottledError("slow", retry_after=7)
    response = await api.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert response.headers["retry-after"] == "7"
    assert _parse("GetMicrovm", response)["Error"]["Code"] == "ThrottlingException"


async def test_tag_operations_answer_conflicts_with_the_shape_they_declare(
    api: ApiHarness,
) -> None:
    api.operations.errors["TagResource"] = ConflictError("busy")
    response = await api.call("TagResource", example_input("TagResource"))
    assert response.status_code == 409
    assert response.headers["x-amzn-errortype"] == "ResourceConflictException"


async def test_unexpected_exceptions_are_500_without_internals(api: ApiHarness) -> None:
    api.operations.crash["GetMicrovm"] = RuntimeError("/secret/path exploded")
    response = await api.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert response.status_code == 500
    assert response.headers["x-amzn-errortype"] == "InternalServerException"
    assert "secret" not in response.text


async def test_outputs_breaking_their_shape_are_500_when_checked(tmp_path: Any) -> None:
    harness = ApiHarness(tmp_path, check_outputs=True)
    harness.operations.outputs["GetMicrovm"] = {"microvmId": "vm"}
    async with harness.client:
        response = await harness.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert response.status_code == 500


async def test_operations_that_hang_are_cut_off(tmp_path: Any) -> None:
    import asyncio

    harness = ApiHarness(tmp_path, invoke_timeout=0.05)

    async def hang(operation: str, params: dict[str, Any], caller: Any) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    harness.operations.invoke = hang  # type: ignore[method-assign]
    async with harness.client:
        response = await harness.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert response.status_code == 500
    assert response.headers["x-amzn-errortype"] == "InternalServerException"


async def test_invalid_input_is_400_and_never_reaches_core(api: ApiHarness) -> None:
    response = await api.call(
        "CreateMicrovmImage", {**example_input("CreateMicrovmImage"), "name": "a b"}
    )
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert response.json()["message"].startswith(
        "1 validation error detected: Value 'a b' at 'name'"
    )
    assert api.operations.calls == []


async def test_malformed_json_is_400(api: ApiHarness) -> None:
    response = await api.signed_raw("POST", "/2025-09-09/microvms", b"{oops")
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert api.operations.calls == []


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/nope"), ("GET", "/"), ("PATCH", "/2025-09-09/microvms/vm"), ("POST", "/ping")],
)
async def test_unknown_routes_are_404_with_a_model_error(
    api: ApiHarness, method: str, target: str
) -> None:
    response = await api.signed_raw(method, target)
    assert response.status_code == 404
    assert response.headers["x-amzn-errortype"] == "ResourceNotFoundException"
    assert "message" in response.json()


async def test_bodies_over_the_limit_are_413(tmp_path: Any) -> None:
    harness = ApiHarness(tmp_path, max_body_bytes=1024)
    async with harness.client:
        body = json.dumps({"imageIdentifier": "i", "runHookPayload": "x" * 2000}).encode()
        response = await harness.signed_raw("POST", "/2025-09-09/microvms", body)
    assert response.status_code == 413
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    assert harness.operations.calls == []


async def test_ping_answers_without_auth(api: ApiHarness) -> None:
    response = await api.client.get("/ping")
    assert response.status_code == 200


async def test_unsigned_requests_are_403_before_routing(api: ApiHarness) -> None:
    for target in ("/2025-09-09/microvms", "/nope"):
        response = await api.client.get(target)
        assert response.status_code == 403
        assert response.headers["x-amzn-errortype"] == "AccessDeniedException"
    assert api.operations.calls == []


async def test_every_response_carries_a_request_id(api: ApiHarness) -> None:
    response = await api.call("GetMicrovm", {"microvmIdentifier": "vm"})
    assert _parse("GetMicrovm", response)["ResponseMetadata"]["RequestId"]


async def test_extra_routes_are_signed_and_see_the_caller(tmp_path: Any) -> None:
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from embervm.api import caller_of

    async def logs(request: Request) -> PlainTextResponse:
        return PlainTextResponse(caller_of(request).access_key_id)

    harness = ApiHarness(tmp_path, extra_routes=[Route("/embervm/v1/logs", logs)])
    async with harness.client:
        assert (await harness.client.get("/embervm/v1/logs")).status_code == 403
        response = await harness.signed_raw("GET", "/embervm/v1/logs")
    assert response.text == harness.credential.access_key_id


async def test_labels_with_encoded_newlines_still_get_a_model_error(api: ApiHarness) -> None:
    # Found by the fuzz test: Starlette's own path patterns stop at a decoded newline.
    params = {"imageIdentifier": "web", "imageVersion": "a\nb"}
    response = await api.call("DeleteMicrovmImageVersion", params)
    assert response.status_code == 400
    assert response.headers["x-amzn-errortype"] == "ValidationException"


async def _websocket_handshake(harness: ApiHarness, headers: dict[str, str]) -> list[Any]:
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/embervm/v1/shell",
        "raw_path": b"/embervm/v1/shell",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "subprotocols": [],
    }
    incoming = [{"type": "websocket.connect"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Any) -> None:
        sent.append(message)

    await harness.app(scope, receive, send)
    return sent


async def test_websocket_extra_routes_need_a_signed_handshake(tmp_path: Any) -> None:
    from botocore.awsrequest import AWSRequest
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket
    from tests.framework.fake_api import sign

    from embervm.api import caller_of

    async def shell(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(caller_of(websocket).access_key_id)
        await websocket.close()

    harness = ApiHarness(tmp_path, extra_routes=[WebSocketRoute("/embervm/v1/shell", shell)])
    denied = await _websocket_handshake(harness, {"host": "testserver"})
    assert denied == [{"type": "websocket.close", "code": 1008}]

    request = AWSRequest(method="GET", url="http://testserver/embervm/v1/shell")
    sign(request, harness.credential.access_key_id, harness.credential.secret_access_key)
    headers = {"host": "testserver", **dict(request.prepare().headers.items())}
    accepted = await _websocket_handshake(harness, headers)
    assert accepted[0]["type"] == "websocket.accept"
    assert accepted[1] == {
        "type": "websocket.send",
        "text": harness.credential.access_key_id,
    }


async def test_websockets_to_unknown_paths_are_closed(api: ApiHarness) -> None:
    from botocore.awsrequest import AWSRequest
    from tests.framework.fake_api import sign

    request = AWSRequest(method="GET", url="http://testserver/embervm/v1/shell")
    sign(request, api.credential.access_key_id, api.credential.secret_access_key)
    headers = {"host": "testserver", **dict(request.prepare().headers.items())}
    assert await _websocket_handshake(api, headers) == [{"type": "websocket.close", "code": 1008}]

"""Requests the model routes, turned into calls into core: ``ModelDispatch``.

After ``_SigV4Middleware`` (``_app``) put the verified ``Caller`` and the body into the scope:
route (``_routing``) → parse (``_parse``) → shape rules (``embervm.model``) → one
``invoke(name, params, caller)`` with a deadline → serialize (``_serialize``). Every
``ApiError`` becomes its model error shape (``_errors``); anything else is logged and answered
500 ``InternalServerException`` without details.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from embervm.errors import ApiError, InternalError, NotFoundError, ValidationError
from embervm.model import (
    OperationName,
    is_operation_name,
    operation_model,
    validate_input,
    validate_output,
    validation_message,
)

from ._errors import serialize_error
from ._parse import parse_request
from ._routing import Router, parse_query
from ._serialize import Serialized, serialize_output

if TYPE_CHECKING:
    from embervm.core.caller import Caller

log = logging.getLogger("embervm.api")

CALLER_SCOPE_KEY = "embervm.caller"
BODY_SCOPE_KEY = "embervm.body"
PUBLIC_PATHS = frozenset({"/ping"})


class OperationInvoker(Protocol):
    """What the API calls: core's ``embervm.core.operations.Operations`` implements it."""

    async def invoke(
        self, operation: OperationName, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any]: ...


class ModelDispatch:
    """The ASGI handler of every path no extra route took: the model's operations."""

    def __init__(
        self, operations: OperationInvoker, *, invoke_timeout: float, check_outputs: bool
    ) -> None:
        self.router = Router.from_model()
        self.operations = operations
        self.invoke_timeout = invoke_timeout
        self.check_outputs = check_outputs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no extra route took it: nothing to talk to
            await send({"type": "websocket.close", "code": 1008})
            return
        request_id = scope.get("state", {}).get("request_id") or str(uuid.uuid4())
        if is_public_path(scope):
            await send_serialized(
                send, Serialized(200, {"content-type": "application/json"}, b"{}"), request_id
            )
            return
        operation: str | None = None
        try:
            query = parse_query(scope.get("query_string", b""))
            raw_path = raw_path_of(scope)
            match = self.router.match(scope["method"], raw_path, query)
            if match is None or not is_operation_name(match.route.operation):
                raise NotFoundError(f"No operation matches {scope['method']} {scope['path']}")
            operation = match.route.operation
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            params = parse_request(match, query, headers, scope[BODY_SCOPE_KEY])
            violations = validate_input(operation, params)
            if violations:
                raise ValidationError(validation_message(violations))
            caller: Caller = scope[CALLER_SCOPE_KEY]
            try:
                async with asyncio.timeout(self.invoke_timeout):
                    output = await self.operations.invoke(operation, params, caller)
            except TimeoutError:
                log.error("%s %s timed out after %ss", request_id, operation, self.invoke_timeout)
                raise InternalError("The operation did not finish in time") from None
            if self.check_outputs:
                bad = validate_output(operation, output)
                if bad:
                    log.error(
                        "%s %s output breaks its shape: %s",
                        request_id,
                        operation,
                        validation_message(bad),
                    )
                    raise InternalError("Internal server error")
            result = serialize_output(operation_model(operation), output)
        except ApiError as err:
            model = operation_model(operation) if operation else None
            result = serialize_error(model, err)
        except Exception:
            log.exception("%s %s failed", request_id, operation or scope.get("path"))
            result = serialize_error(
                operation_model(operation) if operation else None,
                InternalError(f"Internal server error (request id {request_id})"),
            )
        await send_serialized(send, result, request_id)


def is_public_path(scope: Scope) -> bool:
    return scope.get("method") in ("GET", "HEAD") and scope.get("path") in PUBLIC_PATHS


def caller_of(request: HTTPConnection) -> Caller:
    """The verified caller of a request that reached an ``extra_routes`` handler."""
    caller: Caller = request.scope[CALLER_SCOPE_KEY]
    return caller


def raw_path_of(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).decode("latin-1").split("?", 1)[0]
    from urllib.parse import quote

    return quote(scope["path"])


async def send_serialized(send: Send, result: Serialized, request_id: str) -> None:
    headers = dict(result.headers)
    headers["x-amzn-requestid"] = request_id
    response = Response(result.body, status_code=result.status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}

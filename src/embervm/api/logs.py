"""Embervm's log-streaming extension endpoints (not in the AWS model; SigV4 like the rest).

- ``GET /embervm/v1/microvm-images/{name}/versions/{version}/logs[?follow=true]``: the
  build's JSON log records, one per line;
- ``GET /embervm/v1/microvms/{id}/logs[?follow=true]``: the app's output, one line each.

``follow=true`` keeps the response open and streams new lines until the build or the VM ends
(or the client goes away). Unknown resources get the model's ResourceNotFoundException shape.
Lines are capped at ``MAX_LINE`` characters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from embervm.api._app import caller_of
from embervm.api._errors import serialize_error
from embervm.core.caller import Caller
from embervm.errors import ApiError

MAX_LINE = 64 * 1024


class LogLines(Protocol):
    """What ``embervm.core.Operations`` offers for logs."""

    async def build_log_lines(
        self, image: str, version: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]: ...

    async def app_log_lines(
        self, microvm_id: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]: ...


def _follow(request: Request) -> bool:
    return request.query_params.get("follow", "").lower() in ("1", "true", "yes")


async def _encoded(lines: AsyncIterator[str]) -> AsyncIterator[bytes]:
    async for line in lines:
        yield (line[:MAX_LINE].replace("\n", " ") + "\n").encode()


def _error(error: ApiError) -> Response:
    result = serialize_error(None, error)
    return Response(result.body, status_code=result.status, headers=dict(result.headers))


def log_routes(source: LogLines) -> list[BaseRoute]:
    async def build_logs(request: Request) -> Response:
        params = request.path_params
        try:
            lines = await source.build_log_lines(
                params["name"], params["version"], _follow(request), caller=caller_of(request)
            )
        except ApiError as exc:
            return _error(exc)
        return StreamingResponse(_encoded(lines), media_type="text/plain; charset=utf-8")

    async def app_logs(request: Request) -> Response:
        try:
            lines = await source.app_log_lines(
                request.path_params["microvm_id"], _follow(request), caller=caller_of(request)
            )
        except ApiError as exc:
            return _error(exc)
        return StreamingResponse(_encoded(lines), media_type="text/plain; charset=utf-8")

    return [
        Route("/embervm/v1/microvm-images/{name}/versions/{version}/logs", build_logs,
              methods=["GET"]),
        Route("/embervm/v1/microvms/{microvm_id}/logs", app_logs, methods=["GET"]),
    ]  # fmt: skip

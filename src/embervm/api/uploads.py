"""Embervm's upload extension endpoint: code artifacts sent to the server (not in the AWS model).

``PUT /embervm/v1/uploads`` with the zip as the body and its hex SHA-256 in a signed
``x-amz-content-sha256`` header answers ``{"codeArtifactUri": "file://.../uploads/<sha256>.zip",
"size": n}``: a URI that CreateMicrovmImage / UpdateMicrovmImage accept (the server's artifact
policy allows its own ``uploads/`` folder). So ``embervm images create ./app`` works against a
server on another machine, where the CLI cannot write into the data directory.

The body is never held in memory: ``Content-Length`` is required, and the body streams, within
``UPLOAD_TIMEOUT``, into the server's ``UploadSink`` (``embervm.blobs.uploads.UploadArea``),
which bounds it, hashes it as it arrives, discards a body whose hash is not the signed one (the
signature covered only the hash it declared) and names files by content.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from embervm.api._dispatch import caller_of
from embervm.api._errors import serialize_error
from embervm.errors import ApiError, ValidationError

UPLOAD_PATH = "/embervm/v1/uploads"
UPLOAD_TIMEOUT = 600.0


class UploadSink(Protocol):
    """Where an upload's body goes (``embervm.blobs.uploads.UploadArea``, composed by the
    server): it checks length, size cap and hash, and names the file."""

    async def receive(
        self, chunks: AsyncIterator[bytes], *, length: int, sha256: str
    ) -> tuple[Path, int]: ...


def upload_routes(sink: UploadSink) -> list[BaseRoute]:
    """The route; mount it with ``create_api_app(..., streamed_paths={UPLOAD_PATH})``."""

    async def upload(request: Request) -> Response:
        caller_of(request)  # the middleware verified the signature
        try:
            async with asyncio.timeout(UPLOAD_TIMEOUT):
                body = await _receive(request, sink)
        except TimeoutError:
            return _error(ValidationError("The upload was not received in time"))
        except ApiError as err:
            return _error(err)
        payload = {"codeArtifactUri": body[0].as_uri(), "size": body[1]}
        return Response(json.dumps(payload), media_type="application/json")

    return [Route(UPLOAD_PATH, upload, methods=["PUT"])]


async def _receive(request: Request, sink: UploadSink) -> tuple[Path, int]:
    length_field = request.headers.get("content-length", "")
    if not length_field.isdigit():
        raise ValidationError("An upload needs a Content-Length")
    declared = request.headers.get("x-amz-content-sha256", "")
    return await sink.receive(_body(request), length=int(length_field), sha256=declared)


async def _body(request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ValidationError("The upload was cut off") from None


def _error(err: ApiError) -> Response:
    result = serialize_error(None, err)
    return Response(result.body, status_code=result.status, headers=result.headers)

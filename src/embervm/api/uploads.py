"""Embervm's upload extension endpoint: code artifacts sent to the server (not in the AWS model).

``PUT /embervm/v1/uploads`` with the zip as the body and its hex SHA-256 in a signed
``x-amz-content-sha256`` header answers ``{"codeArtifactUri": "file://.../uploads/<sha256>.zip",
"size": n}``: a URI that CreateMicrovmImage / UpdateMicrovmImage accept (the server's artifact
policy allows its own ``uploads/`` folder). So ``embervm images create ./app`` works against a
server on another machine, where the CLI cannot write into the data directory.

The body is never held in memory: it streams into a temp file in ``uploads/`` while being hashed,
at most ``max_bytes`` (``Content-Length`` is required and checked first) and within
``UPLOAD_TIMEOUT``. A body whose hash is not the signed one is discarded (the signature covered
only the hash it declared). Files are named by content, so uploading the same zip twice keeps
one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from embervm.api._dispatch import caller_of
from embervm.api._errors import serialize_error
from embervm.blobs import DEFAULT_MAX_BYTES
from embervm.errors import ApiError, ValidationError

UPLOAD_PATH = "/embervm/v1/uploads"
UPLOAD_TIMEOUT = 600.0
_WRITE_BATCH = 1 << 20


def upload_routes(uploads: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[BaseRoute]:
    """The route; mount it with ``create_api_app(..., streamed_paths={UPLOAD_PATH})``."""

    async def upload(request: Request) -> Response:
        caller_of(request)  # the middleware verified the signature
        try:
            async with asyncio.timeout(UPLOAD_TIMEOUT):
                body = await _receive(request, uploads, max_bytes)
        except TimeoutError:
            return _error(ValidationError("The upload was not received in time"))
        except ApiError as err:
            return _error(err)
        payload = {"codeArtifactUri": body[0].as_uri(), "size": body[1]}
        return Response(json.dumps(payload), media_type="application/json")

    return [Route(UPLOAD_PATH, upload, methods=["PUT"])]


async def _receive(request: Request, uploads: Path, max_bytes: int) -> tuple[Path, int]:
    declared = request.headers.get("x-amz-content-sha256", "")
    declared = declared.lower()
    length_field = request.headers.get("content-length", "")
    if not length_field.isdigit():
        raise ValidationError("An upload needs a Content-Length")
    length = int(length_field)
    if length > max_bytes:
        raise ValidationError(f"An upload is at most {max_bytes} bytes")
    await asyncio.to_thread(uploads.mkdir, parents=True, exist_ok=True)
    temp = uploads / f".upload-{secrets.token_hex(8)}.tmp"
    digest = hashlib.sha256()
    size = 0
    try:
        with await asyncio.to_thread(temp.open, "wb") as out:
            batch: list[bytes] = []
            pending = 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > length:
                        raise ValidationError("The upload is longer than its Content-Length")
                    digest.update(chunk)
                    batch.append(chunk)
                    pending += len(chunk)
                    if pending >= _WRITE_BATCH:
                        await asyncio.to_thread(out.writelines, batch)
                        batch, pending = [], 0
            except ClientDisconnect:
                raise ValidationError("The upload was cut off") from None
            await asyncio.to_thread(out.writelines, batch)
            await asyncio.to_thread(os.fsync, out.fileno())
        if size != length:
            raise ValidationError("The upload ended before its Content-Length")
        if digest.hexdigest() != declared:
            raise ValidationError("The upload does not match its x-amz-content-sha256")
        final = uploads / f"{declared}.zip"
        await asyncio.to_thread(os.replace, temp, final)
        return final, size
    finally:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(temp.unlink)


def _error(err: ApiError) -> Response:
    result = serialize_error(None, err)
    return Response(result.body, status_code=result.status, headers=result.headers)

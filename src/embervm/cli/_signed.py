"""SigV4-signed streaming requests to Embervm's extension endpoints (build and app logs, code
uploads).

boto3 covers the model's operations; the extension endpoints stream, so they are called with
httpx and signed with botocore's own signer, exactly as the server verifies them (an upload
signs the SHA-256 of its body, sent in ``x-amz-content-sha256``). Their errors come
in the model's shapes (``x-amzn-ErrorType`` + ``{"message": ...}``) and get the same exit codes
as boto3's; a stream that breaks after it started is a failure (exit 1), not "unreachable".
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from embervm.cli._context import EXIT_FAILED, CliContext, CliError
from embervm.cli._errors import api_error, unreachable

MAX_ERROR_BODY = 16 * 1024
UPLOAD_CHUNK = 1 << 20


def _signed_headers(
    ctx: CliContext, method: str, url: str, body_sha256: str | None = None
) -> dict[str, str]:
    key, secret = ctx.credentials()
    request = AWSRequest(method=method, url=url, data=b"")
    if body_sha256 is not None:
        request.headers["X-Amz-Content-SHA256"] = body_sha256
    SigV4Auth(Credentials(key, secret), "lambda", ctx.region).add_auth(request)
    return dict(request.headers.items())


def upload(ctx: CliContext, path: Path) -> str:
    """Send a code artifact to the server (``PUT /embervm/v1/uploads``); its ``file://`` URI
    there, for ``codeArtifact.uri``."""
    url = f"{ctx.endpoint_url}/embervm/v1/uploads"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            digest.update(chunk)
    headers = _signed_headers(ctx, "PUT", url, digest.hexdigest())
    headers["Content-Length"] = str(path.stat().st_size)

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                yield chunk

    try:
        with httpx.Client(verify=ctx.api_tls(), timeout=httpx.Timeout(30.0, write=300.0)) as client:
            response = client.put(url, content=chunks(), headers=headers)
    except httpx.TransportError as exc:
        raise unreachable(ctx.endpoint_url) from exc
    if response.status_code >= 400:
        raise _error_of(response)
    try:
        return str(response.json()["codeArtifactUri"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CliError("the server's answer to an upload is not understood", EXIT_FAILED) from exc


def _error_of(response: httpx.Response) -> CliError:
    """The model error a failed response carries (its body read up to ``MAX_ERROR_BODY``)."""
    body = b""
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    try:
        message = str(json.loads(body[:MAX_ERROR_BODY]).get("message", ""))
    except (ValueError, AttributeError):
        message = body[:200].decode("utf-8", "replace")
    code = response.headers.get("x-amzn-errortype", "").split(":", 1)[0]
    if not code:
        return CliError(f"the server answered {response.status_code}: {message}", EXIT_FAILED)
    return api_error(code, message)


def stream_lines(ctx: CliContext, path: str, *, follow: bool) -> Iterator[str]:
    """Yield the lines of a log endpoint; with ``follow`` until the server ends the stream."""
    url = f"{ctx.endpoint_url}{path}" + ("?follow=true" if follow else "")
    headers = _signed_headers(ctx, "GET", url)
    timeout = httpx.Timeout(10.0, read=None if follow else 30.0)
    started = False
    try:
        with (
            httpx.Client(verify=ctx.api_tls(), timeout=timeout) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 400:
                raise _error_of(response)
            started = True
            yield from response.iter_lines()
    except httpx.TransportError as exc:
        if started:
            raise CliError(f"the log stream broke: {exc}", EXIT_FAILED) from exc
        raise unreachable(ctx.endpoint_url) from exc

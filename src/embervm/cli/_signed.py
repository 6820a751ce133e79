"""SigV4-signed streaming requests to Embervm's extension endpoints (build and app logs).

boto3 covers the model's operations; the log endpoints stream, so they are called with httpx
and signed with botocore's own signer, exactly as the server verifies them. Their errors come
in the model's shapes (``x-amzn-ErrorType`` + ``{"message": ...}``) and get the same exit codes
as boto3's; a stream that breaks after it started is a failure (exit 1), not "unreachable".
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from embervm.cli._context import EXIT_FAILED, EXIT_UNREACHABLE, CliContext, CliError
from embervm.cli._errors import api_error

MAX_ERROR_BODY = 16 * 1024


def _signed_headers(ctx: CliContext, method: str, url: str) -> dict[str, str]:
    key, secret = ctx.credentials()
    request = AWSRequest(method=method, url=url, data=b"")
    SigV4Auth(Credentials(key, secret), "lambda", ctx.region).add_auth(request)
    return dict(request.headers.items())


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
            httpx.Client(timeout=timeout) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 400:
                raise _error_of(response)
            started = True
            yield from response.iter_lines()
    except httpx.TransportError as exc:
        if started:
            raise CliError(f"the log stream broke: {exc}", EXIT_FAILED) from exc
        raise CliError(
            f"cannot reach the Embervm server at {ctx.endpoint_url}: is `embervm server` running?",
            EXIT_UNREACHABLE,
        ) from exc

"""SigV4-signed streaming requests to Embervm's extension endpoints (build and app logs).

boto3 covers the model's operations; the log endpoints stream, so they are called with httpx
and signed with botocore's own signer, exactly as the server verifies them.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from embervm.cli._context import CliContext, CliError


def _signed_headers(ctx: CliContext, method: str, url: str) -> dict[str, str]:
    key, secret = ctx.credentials()
    request = AWSRequest(method=method, url=url, data=b"")
    SigV4Auth(Credentials(key, secret), "lambda", ctx.region).add_auth(request)
    return dict(request.headers.items())


def stream_lines(ctx: CliContext, path: str, *, follow: bool) -> Iterator[str]:
    """Yield the lines of a log endpoint; with ``follow`` until the server ends the stream."""
    url = f"{ctx.endpoint_url}{path}" + ("?follow=true" if follow else "")
    headers = _signed_headers(ctx, "GET", url)
    timeout = httpx.Timeout(10.0, read=None if follow else 30.0)
    try:
        with (
            httpx.Client(timeout=timeout) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code == 404:
                raise CliError("not found", 4)
            if response.status_code >= 400:
                response.read()
                raise CliError(f"the server answered {response.status_code}: {response.text[:200]}")
            yield from response.iter_lines()
    except httpx.TransportError as exc:
        raise CliError(
            f"cannot reach the Embervm server at {ctx.endpoint_url}: is `embervm server` running?",
            3,
        ) from exc

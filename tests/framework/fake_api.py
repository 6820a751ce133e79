"""Fakes for the control API (``embervm.api``): the core it calls, and clients that sign.

- ``FakeOperations`` answers every operation with a model-valid canned output (all members
  filled, from ``embervm.model.example_output``), records each call, and raises a programmed
  ``ApiError`` when told to — enough to drive every operation through boto3 without core.
- ``signed_request``/``sign``: requests serialized and signed by botocore itself (optionally
  at another time, to test clock skew), for clients other than boto3 (Starlette's TestClient,
  httpx) and for sending input boto3 would refuse to send.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest, create_request_object, prepare_request_dict
from botocore.credentials import Credentials
from botocore.serialize import create_serializer

from embervm.errors import ApiError
from embervm.model import example_output, operation_model


@dataclass
class Call:
    operation: str
    params: dict[str, Any]
    caller: Any


@dataclass
class FakeOperations:
    """Canned outputs per operation; ``errors[name]`` is raised instead when set."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, ApiError] = field(default_factory=dict)
    crash: dict[str, BaseException] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    async def invoke(self, operation: str, params: dict[str, Any], caller: Any) -> dict[str, Any]:
        self.calls.append(Call(operation, copy.deepcopy(params), caller))
        if operation in self.crash:
            raise self.crash[operation]
        if operation in self.errors:
            raise self.errors[operation]
        if operation in self.outputs:
            return copy.deepcopy(self.outputs[operation])
        return example_output(operation, full=True)


@dataclass(frozen=True)
class SignedRequest:
    """A request as boto3 would send it: ``target`` is path + query, ready for any client."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


def sign(
    request: AWSRequest,
    access_key_id: str,
    secret_access_key: str,
    *,
    region: str = "us-east-1",
    service: str = "lambda",
    when: dt.datetime | None = None,
) -> None:
    """Sign ``request`` in place with botocore's SigV4, as of ``when`` (default: now)."""
    signer = SigV4Auth(Credentials(access_key_id, secret_access_key), service, region)
    if when is None:
        signer.add_auth(request)
        return
    request.context["timestamp"] = when.astimezone(dt.UTC).strftime(SIGV4_TIMESTAMP)
    signer._modify_request_before_signing(request)
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    signer._inject_signature_to_request(request, signature)


def signed_request(
    operation: str,
    params: dict[str, Any],
    *,
    access_key_id: str,
    secret_access_key: str,
    endpoint: str = "http://127.0.0.1",
    region: str = "us-east-1",
    when: dt.datetime | None = None,
) -> SignedRequest:
    """``params`` serialized by botocore's rest-json serializer and signed: byte for byte what
    boto3 sends for ``operation`` (without its client-side validation, so invalid params pass)."""
    serializer = create_serializer("rest-json", include_validation=False)
    request_dict = serializer.serialize_to_request(params, operation_model(operation))
    prepare_request_dict(request_dict, endpoint_url=endpoint)
    request = create_request_object(request_dict)
    sign(request, access_key_id, secret_access_key, region=region, when=when)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = prepared.body or b""
    return SignedRequest(
        method=prepared.method,
        target=target,
        headers={k: str(v) for k, v in prepared.headers.items()},
        body=body.encode() if isinstance(body, str) else bytes(body),
    )

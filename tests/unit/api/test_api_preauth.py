"""What a client without credentials can make the API read (A7): no body before SigV4's head
checks pass; a signed body is hashed as it arrives and must match its declared hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSRequest
from starlette.types import Message
from tests.framework.api_unit_harness import ENDPOINT, ApiHarness
from tests.framework.fake_api import sign

from embervm.errors import AccessDeniedError

BODY = json.dumps({"imageIdentifier": "web"}).encode()


async def _send_counting_reads(
    harness: ApiHarness, headers: dict[str, str], body: bytes = BODY
) -> tuple[int, int]:
    """(status, how many times the app asked for the body) for a POST /2025-09-09/microvms."""
    reads = 0
    answer: dict[str, Any] = {}

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/2025-09-09/microvms",
        "raw_path": b"/2025-09-09/microvms",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1),
    }
    await harness.app(scope, receive, send)
    return answer["status"], reads


def _signed_headers(harness: ApiHarness, body: bytes = BODY, **extra: str) -> dict[str, str]:
    request = AWSRequest(method="POST", url=ENDPOINT + "/2025-09-09/microvms", data=body,
                         headers=extra)  # fmt: skip
    sign(request, harness.credential.access_key_id, harness.credential.secret_access_key)
    headers = dict(request.prepare().headers.items())
    headers["host"] = "testserver"
    return headers


def _unsigned(headers: dict[str, str]) -> None:
    del headers["Authorization"]


def _unknown_key(headers: dict[str, str]) -> None:
    headers["Authorization"] = headers["Authorization"].replace("Credential=", "Credential=AKIDX")


def _stale_date(headers: dict[str, str]) -> None:
    headers["X-Amz-Date"] = "20200101T000000Z"


def _unsigned_payload(headers: dict[str, str]) -> None:
    headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"


@pytest.mark.parametrize("mangle", [_unsigned, _unknown_key, _stale_date, _unsigned_payload])
async def test_no_body_is_read_before_the_key_id_and_date_pass(
    tmp_path: Path, mangle: Callable[[dict[str, str]], None]
) -> None:
    # A7: the body (up to 6 MiB, 30 s) was read and buffered before SigV4 was looked at.
    harness = ApiHarness(tmp_path)
    headers = _signed_headers(harness)
    mangle(headers)
    status, reads = await _send_counting_reads(harness, headers)
    assert status == 403
    assert reads == 0
    assert harness.operations.calls == []


async def test_a_signed_request_reads_its_body_once(tmp_path: Path) -> None:
    harness = ApiHarness(tmp_path)
    status, reads = await _send_counting_reads(harness, _signed_headers(harness))
    assert status == 200
    assert reads == 1


async def test_a_body_that_does_not_hash_to_its_declared_value_is_refused(tmp_path: Path) -> None:
    harness = ApiHarness(tmp_path)
    declared = hashlib.sha256(BODY).hexdigest()
    headers = _signed_headers(harness, **{"X-Amz-Content-SHA256": declared})
    other = json.dumps({"imageIdentifier": "wex"}).encode()
    status, _ = await _send_counting_reads(harness, headers, body=other)
    assert status == 403
    assert harness.operations.calls == []


def test_admit_refuses_an_unknown_key_before_any_body(tmp_path: Path) -> None:
    harness = ApiHarness(tmp_path)
    headers = _signed_headers(harness)
    harness.store.revoke(harness.credential.access_key_id)
    from embervm.api.sigv4 import SigV4Verifier

    with pytest.raises(AccessDeniedError, match="security token"):
        SigV4Verifier(harness.store).admit(headers.items())

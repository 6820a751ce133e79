"""``PUT /embervm/v1/uploads``: a signed, streamed, bounded, content-addressed code upload."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from botocore.awsrequest import AWSRequest
from tests.framework.api_unit_harness import ENDPOINT, ApiHarness
from tests.framework.fake_api import sign

from embervm.api.uploads import UPLOAD_PATH, upload_routes
from embervm.blobs.uploads import UploadArea

ZIP = b"PK\x03\x04" + b"x" * 5000


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[ApiHarness]:
    harness = ApiHarness(
        tmp_path,
        extra_routes=upload_routes(UploadArea(tmp_path / "uploads", max_bytes=64 * 1024)),
        streamed_paths=frozenset({UPLOAD_PATH}),
    )
    async with harness.client:
        yield harness


def signed_put(api: ApiHarness, declared: str, *, sign_hash: bool = True) -> dict[str, str]:
    request = AWSRequest(method="PUT", url=ENDPOINT + UPLOAD_PATH, data=b"")
    if sign_hash:
        request.headers["X-Amz-Content-SHA256"] = declared
    sign(request, api.credential.access_key_id, api.credential.secret_access_key)
    headers = dict(request.headers.items())  # not prepared: httpx sets the real length
    headers["X-Amz-Content-SHA256"] = declared
    return headers


async def put(api: ApiHarness, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    response = await api.client.put(UPLOAD_PATH, content=body, headers=headers)
    return response.status_code, json.loads(response.content)


async def test_an_upload_lands_under_its_hash_and_answers_a_usable_uri(
    api: ApiHarness, tmp_path: Path
) -> None:
    digest = hashlib.sha256(ZIP).hexdigest()
    status, body = await put(api, ZIP, signed_put(api, digest))
    assert status == 200
    stored = tmp_path / "uploads" / f"{digest}.zip"
    assert body == {"codeArtifactUri": stored.as_uri(), "size": len(ZIP)}
    assert stored.read_bytes() == ZIP
    # The same zip again: the same file, nothing left over.
    assert (await put(api, ZIP, signed_put(api, digest)))[1]["codeArtifactUri"] == stored.as_uri()
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == [f"{digest}.zip"]


async def test_a_body_other_than_the_signed_hash_is_discarded(
    api: ApiHarness, tmp_path: Path
) -> None:
    status, body = await put(api, ZIP, signed_put(api, hashlib.sha256(b"other").hexdigest()))
    assert status == 400
    assert "does not match" in body["message"]
    assert list((tmp_path / "uploads").iterdir()) == []


async def test_an_unsigned_body_hash_is_refused_before_any_byte_is_stored(
    api: ApiHarness, tmp_path: Path
) -> None:
    headers = signed_put(api, hashlib.sha256(ZIP).hexdigest(), sign_hash=False)
    status, body = await put(api, ZIP, headers)
    assert status == 403
    assert "signed x-amz-content-sha256" in body["message"]
    assert not (tmp_path / "uploads").exists()


async def test_unsigned_uploads_are_refused(api: ApiHarness) -> None:
    response = await api.client.put(UPLOAD_PATH, content=ZIP)
    assert response.status_code == 403


async def test_an_upload_over_the_limit_is_refused_from_its_length(
    api: ApiHarness, tmp_path: Path
) -> None:
    big = b"x" * (64 * 1024 + 1)
    status, body = await put(api, big, signed_put(api, hashlib.sha256(big).hexdigest()))
    assert status == 400
    assert "at most 65536 bytes" in body["message"]
    assert not (tmp_path / "uploads").exists()


async def test_an_upload_without_a_length_is_refused(api: ApiHarness, tmp_path: Path) -> None:
    async def chunked() -> AsyncIterator[bytes]:
        yield ZIP

    headers = signed_put(api, hashlib.sha256(ZIP).hexdigest())
    response = await api.client.put(UPLOAD_PATH, content=chunked(), headers=headers)
    assert response.status_code == 400
    assert "Content-Length" in response.json()["message"]

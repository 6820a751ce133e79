"""SigV4 verification: botocore-signed requests pass; every kind of forgery is 403."""

from __future__ import annotations

import datetime as dt
import hashlib
import time

import pytest
from tests.framework.fake_api import SignedRequest, signed_request

from embervm.api.sigv4 import SigV4Verifier, VerifiedIdentity
from embervm.errors import AccessDeniedError

KEY = "AKIAEXAMPLEEXAMPLE00"
SECRET = "s" * 40
NOW = time.time()


class Secrets:
    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets

    def secret_for(self, access_key_id: str) -> str | None:
        return self.secrets.get(access_key_id)


def _verifier(now: float = NOW) -> SigV4Verifier:
    return SigV4Verifier(Secrets({KEY: SECRET}), clock=lambda: now)


def _request(
    operation: str = "RunMicrovm",
    params: dict[str, object] | None = None,
    *,
    secret: str = SECRET,
    key: str = KEY,
    region: str = "us-east-1",
    when: dt.datetime | None = None,
) -> SignedRequest:
    return signed_request(
        operation,
        {"imageIdentifier": "img"} if params is None else params,
        access_key_id=key,
        secret_access_key=secret,
        endpoint="http://127.0.0.1:8700",
        region=region,
        when=when or dt.datetime.fromtimestamp(NOW, tz=dt.UTC),
    )


def _verify(
    request: SignedRequest, verifier: SigV4Verifier | None = None, **changes: object
) -> VerifiedIdentity:
    path, _, query = request.target.partition("?")
    headers = {"host": "127.0.0.1:8700", **{k.lower(): v for k, v in request.headers.items()}}
    headers.update({k: str(v) for k, v in changes.pop("headers", {}).items()})  # type: ignore[attr-defined]
    return (verifier or _verifier()).verify(
        method=str(changes.get("method", request.method)),
        raw_path=str(changes.get("path", path)),
        raw_query=str(changes.get("query", query)),
        headers=list(headers.items()),
        body=bytes(changes.get("body", request.body)),  # type: ignore[call-overload]
    )


def test_a_botocore_signed_request_verifies_and_names_its_signer() -> None:
    assert _verify(_request()) == VerifiedIdentity(KEY, "us-east-1")


def test_any_region_is_accepted_and_reported() -> None:
    assert _verify(_request(region="ap-southeast-7")).region == "ap-southeast-7"


def test_encoded_labels_and_repeated_query_keys_verify() -> None:
    params = {
        "Resource": "arn:aws:lambda:us-east-1:000000000000:microvm-image:web",
        "TagKeys": ["b", "a c", "ü"],
    }
    assert _verify(_request("UntagResource", params)).access_key_id == KEY


def test_wrong_secret_is_denied() -> None:
    with pytest.raises(AccessDeniedError, match="signature we calculated does not match"):
        _verify(_request(secret="t" * 40))


def test_unknown_key_is_denied() -> None:
    with pytest.raises(AccessDeniedError, match=r"security token .* invalid"):
        _verify(_request(key="AKIAUNKNOWNUNKNOWN00"))


@pytest.mark.parametrize("minutes", [-20, 20])
def test_signatures_more_than_15_minutes_off_are_denied(minutes: int) -> None:
    when = dt.datetime.fromtimestamp(NOW + minutes * 60, tz=dt.UTC)
    with pytest.raises(AccessDeniedError, match="Signature expired"):
        _verify(_request(when=when))


def test_signatures_within_the_skew_verify() -> None:
    when = dt.datetime.fromtimestamp(NOW - 14 * 60, tz=dt.UTC)
    assert _verify(_request(when=when)).access_key_id == KEY


def test_tampered_body_is_denied() -> None:
    with pytest.raises(AccessDeniedError):
        _verify(_request(), body=b'{"imageIdentifier": "other"}')


def test_body_hash_header_that_does_not_match_the_body_is_denied() -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(AccessDeniedError, match="x-amz-content-sha256"):
        _verify(_request(), headers={"x-amz-content-sha256": wrong})


def test_unsigned_payload_is_denied() -> None:
    with pytest.raises(AccessDeniedError, match="x-amz-content-sha256"):
        _verify(_request(), headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})


@pytest.mark.parametrize(
    "change",
    [
        {"method": "PUT"},
        {"path": "/2025-09-09/microvms/other"},
        {"query": "maxResults=1"},
        {"headers": {"host": "evil.example"}},
        {"headers": {"x-amz-date": "20200101T000000Z"}},
    ],
)
def test_any_signed_part_changed_is_denied(change: dict[str, object]) -> None:
    with pytest.raises(AccessDeniedError):
        _verify(_request(), **change)


def test_other_services_signatures_are_denied() -> None:
    request = _request()
    forged = request.headers["Authorization"].replace("/lambda/", "/s3/")
    with pytest.raises(AccessDeniedError, match="correct service"):
        _verify(request, headers={"authorization": forged})


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Basic dXNlcjpwYXNz",
        "AWS4-HMAC-SHA256 Credential=AKIA/20250101/us-east-1/lambda/aws4_request",
        "AWS4-HMAC-SHA256 Credential=AKIA/x, SignedHeaders=host, Signature=00",
    ],
)
def test_malformed_authorization_headers_are_denied(authorization: str) -> None:
    with pytest.raises(AccessDeniedError):
        _verify(_request(), headers={"authorization": authorization})


def test_a_signed_header_missing_from_the_request_is_denied() -> None:
    request = _request()
    authorization = request.headers["Authorization"].replace(
        "SignedHeaders=", "SignedHeaders=x-extra;"
    )
    with pytest.raises(AccessDeniedError, match="missing"):
        _verify(request, headers={"authorization": authorization})


def test_a_rotated_secret_takes_effect_despite_the_cached_signing_key() -> None:
    secrets = Secrets({KEY: SECRET})
    verifier = SigV4Verifier(secrets, clock=lambda: NOW)
    assert _verify(_request(), verifier).access_key_id == KEY
    assert _verify(_request(), verifier).access_key_id == KEY  # the cached key
    secrets.secrets[KEY] = "r" * 40
    with pytest.raises(AccessDeniedError, match="signature we calculated does not match"):
        _verify(_request(), verifier)
    assert _verify(_request(secret="r" * 40), verifier).access_key_id == KEY


def test_one_verifier_verifies_requests_of_several_regions_and_times() -> None:
    verifier = _verifier()
    earlier = dt.datetime.fromtimestamp(NOW, tz=dt.UTC) - dt.timedelta(minutes=10)
    for region in ("us-east-1", "eu-west-1"):
        for when in (earlier, dt.datetime.fromtimestamp(NOW, tz=dt.UTC)):
            assert _verify(_request(region=region, when=when), verifier).region == region

"""SigV4 verification by recomputing the signature with botocore's own signer.

No canonicalization is written here: the received request is rebuilt as a botocore
``AWSRequest`` holding exactly the headers the client says it signed, its raw (still encoded)
path and query, and its body; ``SigV4Auth`` then computes the canonical request and string to
sign the way every AWS SDK does. The final HMAC uses the derived signing key (AWS4 + secret →
day → region → service → aws4_request), which is cached: it is the same for a whole day. What
this module adds is the server's side of the
contract: parse ``Authorization``, check the credential scope (service ``lambda``, any region),
the clock skew (±15 min on ``X-Amz-Date``), the body hash, and compare in constant time.

Two steps, so that a client without credentials cannot make the server read a body (A7):
``admit(headers)`` checks everything the head says (the scope, the date, a well-formed declared
body hash, and that the key id exists) before the body is read; ``finish`` then compares the
body's SHA-256 (hashed as it streamed in) with the declared one and checks the signature. An
unknown key is refused by ``admit`` (its message already said so, as AWS's does: A20).

Every failure is ``AccessDeniedError`` (403 ``AccessDeniedException``, a modeled shape of every
operation), with a message that says which check failed but never anything secret.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from embervm.errors import AccessDeniedError

ALGORITHM = "AWS4-HMAC-SHA256"
DEFAULT_MAX_SKEW_SECONDS = 15 * 60
MAX_CACHED_KEYS = 256  # derived signing keys kept (per secret, day, region, service)
_AUTH_FIELDS = re.compile(r"(Credential|SignedHeaders|Signature)=([^,\s]+)")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_REGION = re.compile(r"^[a-z0-9-]{1,64}$")


class SecretLookup(Protocol):
    """Where secrets come from (``CredentialStore`` implements it)."""

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret access key of ``access_key_id``, or None if it is unknown or revoked."""
        ...


@dataclass(frozen=True)
class VerifiedIdentity:
    """Who signed a request that passed verification, and for which region."""

    access_key_id: str
    region: str


@dataclass(frozen=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


@dataclass(frozen=True)
class Admitted:
    """A request whose head names a known key, a valid scope and a current date: its body may
    be read now; ``SigV4Verifier.finish`` checks the signature."""

    auth: _Authorization
    headers: dict[str, list[str]]
    amz_date: str
    declared_sha256: str | None
    secret: str


def _parse_authorization(value: str | None) -> _Authorization:
    if not value:
        raise AccessDeniedError("Missing Authentication Token: the request is not signed")
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise AccessDeniedError(f"Unsupported signing algorithm; use {ALGORITHM}")
    fields = dict(_AUTH_FIELDS.findall(rest))
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise AccessDeniedError(
            "Authorization header requires Credential, SignedHeaders and Signature"
        )
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise AccessDeniedError(
            "Credential should be scoped to a valid region and service: "
            "<key>/<date>/<region>/<service>/aws4_request"
        )
    key, date, region, service, _ = scope
    return _Authorization(
        access_key_id=key,
        date=date,
        region=region,
        service=service,
        signed_headers=tuple(fields["SignedHeaders"].split(";")),
        signature=fields["Signature"],
    )


class SigV4Verifier:
    """Verifies SigV4 ``Authorization`` headers against a ``SecretLookup``."""

    def __init__(
        self,
        secrets_: SecretLookup,
        *,
        service: str = "lambda",
        clock: Callable[[], float] = time.time,
        max_skew_seconds: float = DEFAULT_MAX_SKEW_SECONDS,
    ) -> None:
        self._secrets = secrets_
        self._service = service
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def verify(
        self,
        *,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
    ) -> VerifiedIdentity:
        """The signer of this request, or ``AccessDeniedError`` saying which check failed.

        ``raw_path`` and ``raw_query`` are exactly as received (percent-encoded); ``headers``
        are (name, value) pairs in any case, repeated names allowed. ``body=None``: the body
        is streamed after this check (uploads), so the request must carry a signed
        ``x-amz-content-sha256`` and the receiver must compare it with what arrives.
        """
        admitted = self.admit(headers)
        digest = None if body is None else hashlib.sha256(body).hexdigest()
        return self.finish(
            admitted, method=method, raw_path=raw_path, raw_query=raw_query, body_sha256=digest
        )

    def admit(self, headers: Iterable[tuple[str, str]]) -> Admitted:
        """Everything the head alone can prove, checked before any body is read."""
        by_name: dict[str, list[str]] = {}
        for name, value in headers:
            by_name.setdefault(name.lower(), []).append(value)
        auth = _parse_authorization(_first(by_name, "authorization"))
        self._check_scope(auth)
        amz_date = _first(by_name, "x-amz-date")
        self._check_date(auth, amz_date, signed=set(auth.signed_headers))
        assert amz_date is not None
        declared = _first(by_name, "x-amz-content-sha256")
        if declared is not None and not _SHA256_HEX.match(declared):
            raise AccessDeniedError("x-amz-content-sha256 must be the hex SHA-256 of the body")
        secret = self._secrets.secret_for(auth.access_key_id)
        if secret is None:
            raise AccessDeniedError("The security token included in the request is invalid")
        return Admitted(auth, by_name, amz_date, declared, secret)

    def finish(
        self,
        admitted: Admitted,
        *,
        method: str,
        raw_path: str,
        raw_query: str,
        body_sha256: str | None,
    ) -> VerifiedIdentity:
        """Check the body's hash (None: streamed later, so it must be declared and signed)
        and the signature."""
        auth, declared = admitted.auth, admitted.declared_sha256
        if body_sha256 is None:
            if declared is None or "x-amz-content-sha256" not in auth.signed_headers:
                raise AccessDeniedError("A streamed body needs a signed x-amz-content-sha256")
            body_sha256 = declared
        elif declared is not None and not hmac.compare_digest(body_sha256, declared):
            raise AccessDeniedError("The provided x-amz-content-sha256 does not match the body")

        request = AWSRequest(
            method=method.upper(),
            url=f"http://embervm.invalid{raw_path}" + (f"?{raw_query}" if raw_query else ""),
        )
        for name in auth.signed_headers:
            values = admitted.headers.get(name)
            if not values:
                raise AccessDeniedError(f"Signed header '{name}' is missing from the request")
            for value in values:
                request.headers[name] = value
        request.context["timestamp"] = admitted.amz_date

        credentials = Credentials(auth.access_key_id, admitted.secret)
        signer = SigV4Auth(credentials, auth.service, auth.region)
        # The canonical request's last line is the payload hash: the one computed while the
        # body streamed in (botocore would hash the body a second time).
        canonical = signer.canonical_request(request).rpartition("\n")[0] + "\n" + body_sha256
        string_to_sign = signer.string_to_sign(request, canonical)
        key = self._signing_key(admitted.secret, admitted.amz_date[:8], auth.region, auth.service)
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), auth.signature.encode()):
            raise AccessDeniedError(
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method."
            )
        return VerifiedIdentity(access_key_id=auth.access_key_id, region=auth.region)

    def _signing_key(self, secret: str, day: str, region: str, service: str) -> bytes:
        """SigV4's derived key (four HMACs), cached: it changes once a day per secret."""
        cache_key = (secret, day, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            key = f"AWS4{secret}".encode()
            for part in (day, region, service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            if len(self._keys) >= MAX_CACHED_KEYS:
                self._keys.clear()
            self._keys[cache_key] = key
        return key

    def _check_scope(self, auth: _Authorization) -> None:
        if auth.service != self._service:
            raise AccessDeniedError(
                f"Credential should be scoped to correct service: '{self._service}'"
            )
        if not _REGION.match(auth.region):
            raise AccessDeniedError("Credential should be scoped to a valid region")
        if "host" not in auth.signed_headers:
            raise AccessDeniedError("The 'host' header must be signed")

    def _check_date(self, auth: _Authorization, amz_date: str | None, signed: set[str]) -> None:
        if amz_date is None or "x-amz-date" not in signed:
            raise AccessDeniedError("A signed X-Amz-Date header is required")
        try:
            when = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
        except ValueError:
            raise AccessDeniedError("X-Amz-Date is not in the form YYYYMMDDTHHMMSSZ") from None
        if auth.date != amz_date[:8]:
            raise AccessDeniedError("Credential date does not match X-Amz-Date")
        now = self._clock()
        skew = when.timestamp() - now
        if abs(skew) > self._max_skew:
            stamp = dt.datetime.fromtimestamp(now, tz=dt.UTC).strftime(SIGV4_TIMESTAMP)
            minutes = int(self._max_skew // 60)
            relation = "earlier" if skew < 0 else "later"
            raise AccessDeniedError(
                f"Signature expired: {amz_date} is now {relation} than the allowed window "
                f"({stamp} ± {minutes} min.)"
            )


def _first(by_name: dict[str, list[str]], name: str) -> str | None:
    values = by_name.get(name)
    return values[0] if values else None

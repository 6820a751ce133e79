"""``TokenAuthority``: the endpoint and shell tokens (``X-aws-proxy-auth``).

A token is a compact JWE (``dir`` + ``A256GCM``: encrypted and authenticated with a 256-bit
key only the server holds) whose claims name the VM, the kind (``endpoint`` | ``shell``), the
ports it opens (all, or inclusive ranges), an expiry of at most 60 minutes, when it was
issued and a random id. Clients cannot read or change it; the proxy checks every claim.

Keys live in one JSON file (mode 0600, written atomically), each with a key id carried in the
token's header. ``rotate()`` makes a new key current and keeps the older ones only as long as
tokens they signed can still be valid (the longest lifetime), so rotation never cuts off a
client before its token expires. Every instance reading the same file (one per process of a
fleet sharing a data dir) accepts the same tokens.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from embervm.core.seams import PortGrant, TokenKind
from embervm.errors import EmbervmError

MAX_MINUTES = 60
MAX_TOKEN_CHARS = 4096
#: The protected header is ~{"alg","enc","kid"}: anything much longer is not one of ours (A14).
MAX_HEADER_CHARS = 512
CACHE_SIZE = 4096  # decrypted tokens kept: a client sends the same token on every request
KINDS: frozenset[str] = frozenset({"endpoint", "shell"})
_HEADER = {"alg": "dir", "enc": "A256GCM"}


class TokenRejected(EmbervmError):
    """A token that does not open this door. The reason is for logs, never for clients."""


@dataclass(frozen=True)
class TokenClaims:
    microvm_id: str
    kind: str
    ports: PortGrant
    expires_at: float


def _encode_ports(ports: PortGrant) -> Any:
    return "all" if ports.all_ports else [[lo, hi] for lo, hi in ports.ranges]


def _decode_ports(raw: Any) -> PortGrant:
    if raw == "all":
        return PortGrant(all_ports=True)
    if not isinstance(raw, list) or len(raw) > 64:
        raise TokenRejected("bad ports claim")
    ranges: list[tuple[int, int]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(p, int) and 1 <= p <= 65535 for p in item)
        ):
            raise TokenRejected("bad ports claim")
        ranges.append((item[0], item[1]))
    return PortGrant(ranges=tuple(ranges))


class TokenAuthority:
    """Issues (core's ``TokenIssuer``) and verifies (the proxy) tokens."""

    def __init__(self, keys_file: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.keys_file = keys_file
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, OctKey] = {}
        self._current = ""
        self._loaded_mtime: float | None = None
        self._verified: dict[str, TokenClaims] = {}
        self._load_or_create()

    # -- keys ----------------------------------------------------------------------------

    def _load_or_create(self) -> None:
        with self._lock:
            if not self.keys_file.exists():
                self._write({"current": "", "keys": []}, add_key=True)
            self._read()

    def _read(self) -> None:
        stat = self.keys_file.stat()
        body = json.loads(self.keys_file.read_text())
        keys = {
            k["kid"]: OctKey.import_key(base64.urlsafe_b64decode(k["secret"])) for k in body["keys"]
        }
        if body["current"] not in keys:
            raise EmbervmError(f"{self.keys_file}: the current key is missing")
        self._keys, self._current = keys, body["current"]
        self._loaded_mtime = stat.st_mtime

    def _write(self, body: dict[str, Any], *, add_key: bool) -> None:
        now = self._clock()
        if add_key:
            kid = f"k{int(now)}-{secrets.token_hex(4)}"
            secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
            body["keys"].append({"kid": kid, "secret": secret, "created": now})
            body["current"] = kid
        self.keys_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.keys_file.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.keys_file)

    def rotate(self) -> str:
        """A new current key; keys retired longer ago than a token can live are dropped."""
        with self._lock:
            body = json.loads(self.keys_file.read_text())
            horizon = self._clock() - MAX_MINUTES * 60 - 60
            current = body["current"]
            body["keys"] = [
                k for k in body["keys"] if k["kid"] == current or k.get("retired", 0) > horizon
            ]
            for k in body["keys"]:
                if k["kid"] == current:
                    k["retired"] = self._clock()
            self._write(body, add_key=True)
            self._read()
            return self._current

    def _refresh(self) -> None:
        """Pick up a rotation done by another process (cheap: one stat)."""
        try:
            mtime = self.keys_file.stat().st_mtime
        except OSError:
            return
        if mtime != self._loaded_mtime:
            with self._lock:
                self._read()

    # -- TokenIssuer ---------------------------------------------------------------------

    def issue(
        self, microvm_id: str, *, kind: TokenKind, ports: PortGrant, expires_in_minutes: int
    ) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        minutes = max(1, min(int(expires_in_minutes), MAX_MINUTES))
        now = self._clock()
        claims = {
            "vm": microvm_id,
            "kind": kind,
            "ports": _encode_ports(ports),
            "iat": int(now),
            "exp": int(now + minutes * 60),
            "jti": secrets.token_urlsafe(12),
        }
        self._refresh()
        header = {**_HEADER, "kid": self._current}
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return jwe.encrypt_compact(header, payload, self._keys[self._current])

    # -- the proxy's side ----------------------------------------------------------------

    def claims(self, token: str) -> TokenClaims:
        """Decrypt and check a token's integrity and expiry (not what it grants)."""
        if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 4:
            raise TokenRejected("malformed token")
        segment = token.split(".", 1)[0]
        if len(segment) > MAX_HEADER_CHARS:
            raise TokenRejected("malformed token")
        self._refresh()
        try:
            header = json.loads(base64.urlsafe_b64decode(segment + "=="))
            if not isinstance(header, dict):
                raise TokenRejected("malformed token")
            key = self._keys[header["kid"]]
            if {k: header.get(k) for k in _HEADER} != _HEADER:
                raise TokenRejected("unexpected algorithm")
            body = json.loads(jwe.decrypt_compact(token, key).plaintext or b"")
            claims = TokenClaims(
                microvm_id=str(body["vm"]),
                kind=str(body["kind"]),
                ports=_decode_ports(body["ports"]),
                expires_at=float(body["exp"]),
            )
        except TokenRejected:
            raise
        except (JoseError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise TokenRejected(f"undecodable token ({type(exc).__name__})") from exc
        if claims.expires_at <= self._clock():
            raise TokenRejected("expired token")
        return claims

    def verify(self, token: str, *, microvm_id: str, port: int, kind: str) -> TokenClaims:
        """The token opens ``port`` of ``microvm_id`` for ``kind`` traffic, or TokenRejected.
        A token decrypted before is checked from memory (claims cannot change; expiry is
        checked every time)."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self.claims(token)
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        elif claims.expires_at <= self._clock():
            del self._verified[token]
            raise TokenRejected("expired token")
        if claims.microvm_id != microvm_id:
            raise TokenRejected("token for another MicroVM")
        if claims.kind != kind:
            raise TokenRejected(f"{claims.kind} token used for {kind}")
        if not claims.ports.allows(port):
            raise TokenRejected(f"port {port} not allowed by the token")
        return claims

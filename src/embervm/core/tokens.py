"""``TokenAuthority``: the endpoint and shell tokens (``X-aws-proxy-auth``).

A token is a compact JWE (``dir`` + ``A256GCM``: encrypted and authenticated with a 256-bit
key only the server holds) whose claims name the VM, the kind (``endpoint`` | ``shell``), the
ports it opens (all, or inclusive ranges), an expiry of at most 60 minutes, when it was
issued and a random id. Clients cannot read or change it; the proxy checks every claim.

The keys come from a ``KeyRing``, each with a key id carried in the token's header.
``rotate()`` makes a new key current and keeps the older ones only as long as tokens they
signed can still be valid (the longest lifetime), so a scheduled rotation never cuts off a
client before its token expires; ``rotate(revoke=True)`` drops every older key at once, so
every token issued before is refused and the sessions it opened end (the proxy asks
``current(claims)`` every few seconds). Two rings:

- ``FileKeyRing`` (the default: one machine): one JSON file (mode 0600, written atomically
  with ``fileio.atomic_write``, changed under an advisory lock so the server's scheduled
  rotation and ``embervm tokens rotate`` never lose each other's key). Every instance reading
  the same file accepts the same tokens and notices a rotation, a revocation or a deleted file
  with one ``stat``, at most ``KEY_FILE_RECHECK_SECONDS`` late.
- ``core.keyring_store.StoreKeyRing`` (a fleet): the store's ``secrets`` table, shared by the
  ``api`` processes that seal tokens and the ``proxy`` processes on other machines that open
  them; a task polls the ring's version, so the proxy's path never waits on the database (how
  stale a process can be: that module's doc).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from embervm.contracts import PortGrant, TokenKind
from embervm.errors import EmbervmError
from embervm.fileio import atomic_write

log = logging.getLogger("embervm.tokens")

MAX_MINUTES = 60
#: A retired key is kept this long: every token it sealed has expired by then.
RETIRED_KEY_SECONDS = MAX_MINUTES * 60 + 60
#: How often a server rotating on a schedule looks whether the current key is due.
ROTATION_CHECK_SECONDS = 300.0
MAX_TOKEN_CHARS = 4096
#: The protected header is ~{"alg","enc","kid"}: anything much longer is not one of ours (A14).
MAX_HEADER_CHARS = 512
KEY_FILE_RECHECK_SECONDS = 1.0
"""How late a request may see a rotation or revocation another process wrote in the key file
(``current``, which open sessions call, always looks); the store's ring polls this often."""
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
    key_id: str  # the key that sealed the token: the token dies with it (``current``)


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


@dataclass(frozen=True)
class KeySet:
    """A ring's keys as loaded: ``current`` seals new tokens, any of ``keys`` opens one."""

    current: str
    keys: Mapping[str, OctKey] = field(repr=False)


class KeyRing(Protocol):
    """Where a ``TokenAuthority``'s keys live: ``FileKeyRing`` (one machine, the default) or
    ``core.keyring_store.StoreKeyRing`` (a fleet's roles, in the store)."""

    @property
    def loaded(self) -> KeySet:
        """The keys as last loaded: no I/O (the proxy reads it on every request)."""
        ...

    def recheck(self) -> None:
        """Look for a change another process made, cheaply and without waiting on a database
        (the file: one ``stat``, a re-read if it changed; the store: nothing, its own task
        polls). ``TokenAuthority`` calls it at most every ``KEY_FILE_RECHECK_SECONDS`` per
        request, and on every ``issue``, ``claims`` and ``current``."""
        ...

    async def rotate(
        self, *, now: float, revoke: bool = False, due_before: float | None = None
    ) -> KeySet | None:
        """Under a lock across processes (two rotations never lose a key): a new current key
        made ``now``; the previous one retired at ``now``, keys retired more than
        ``RETIRED_KEY_SECONDS`` ago dropped, or with ``revoke`` every older key dropped.
        Returns the new set (also ``loaded`` from then on). With ``due_before``: only if the
        current key was made at or before it, else None and nothing changes."""
        ...


def new_key_id(now: float) -> str:
    """A fresh key id: when, and 32 random bits (two rotations at one second differ)."""
    return f"k{int(now)}-{secrets.token_hex(4)}"


class FileKeyRing:
    """The keys in one JSON file (the module doc), mode 0600, changed under an advisory lock."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock  # the time of a first key, made when the file is missing
        self._lock = threading.Lock()
        self._loaded_stamp: tuple[int, int, int] | None = None
        self.loaded = KeySet(current="", keys={})
        with self._lock:
            self._load()

    def _load(self) -> None:
        """Read the key file, or start a new one (first start, or the file was deleted: every
        token sealed by the lost keys is refused from now on)."""
        if not self.path.exists():
            with self._file_lock():
                if not self.path.exists():
                    self._write({"current": "", "keys": []}, now=self._clock())
        self._read()

    def _read(self) -> None:
        stamp = _file_stamp(self.path)
        body = json.loads(self.path.read_text())
        keys = {
            k["kid"]: OctKey.import_key(base64.urlsafe_b64decode(k["secret"])) for k in body["keys"]
        }
        if body["current"] not in keys:
            raise EmbervmError(f"{self.path}: the current key is missing")
        self.loaded = KeySet(current=body["current"], keys=keys)
        self._loaded_stamp = stamp

    def _write(self, body: dict[str, Any], *, now: float) -> None:
        """``body`` with a new current key made ``now``, written atomically."""
        kid = new_key_id(now)
        secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
        body["keys"].append({"kid": kid, "secret": secret, "created": now})
        body["current"] = kid
        atomic_write(self.path, json.dumps(body), mode=0o600)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An advisory lock beside the key file, across processes (the server's scheduled
        rotation and ``embervm tokens rotate``): a read-change-write never loses a key."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def recheck(self) -> None:
        """Pick up a rotation, revocation or deletion done by another process (one stat)."""
        if _file_stamp(self.path) != self._loaded_stamp:
            with self._lock:
                self._load()

    def rotate_now(
        self, *, now: float, revoke: bool = False, due_before: float | None = None
    ) -> KeySet | None:
        """``rotate``, blocking (the file's lock): for the CLI and synchronous callers."""
        with self._lock, self._file_lock():
            body = json.loads(self.path.read_text()) if self.path.exists() else {}
            previous = body.get("current", "")
            if due_before is not None:
                created = next(
                    (k.get("created", 0.0) for k in body.get("keys", []) if k["kid"] == previous),
                    0.0,
                )
                if created > due_before:
                    return None
            keys = [] if revoke else body.get("keys", [])
            for k in keys:
                if k["kid"] == previous:
                    k["retired"] = now
            body["keys"] = [k for k in keys if k.get("retired", now) > now - RETIRED_KEY_SECONDS]
            self._write(body, now=now)
            self._read()
            return self.loaded

    async def rotate(
        self, *, now: float, revoke: bool = False, due_before: float | None = None
    ) -> KeySet | None:
        return await asyncio.to_thread(
            self.rotate_now, now=now, revoke=revoke, due_before=due_before
        )


class TokenAuthority:
    """Issues (core's ``TokenIssuer``) and verifies (the proxy) tokens, with the keys of one
    ``KeyRing``: a path is a ``FileKeyRing`` (one machine: ``server/app.py``, the CLI); a fleet
    passes ``await StoreKeyRing.open(repository)`` (``core.keyring_store``)."""

    def __init__(self, keys: Path | KeyRing, *, clock: Callable[[], float] = time.time) -> None:
        self.ring: KeyRing = FileKeyRing(keys, clock=clock) if isinstance(keys, Path) else keys
        self.keys_file = self.ring.path if isinstance(self.ring, FileKeyRing) else None
        self._clock = clock
        self._verified: dict[str, TokenClaims] = {}
        self._next_check = 0.0  # monotonic time of the hot path's next ``recheck``

    # -- keys ----------------------------------------------------------------------------

    @property
    def _current(self) -> str:
        return self.ring.loaded.current

    def _file_ring(self) -> FileKeyRing:
        if not isinstance(self.ring, FileKeyRing):
            raise TypeError("this key ring rotates with 'await rotate_async()'")
        return self.ring

    def rotate(self, *, revoke: bool = False) -> str:
        """A new current key, and its id. Without ``revoke``, the keys before it stay until
        every token they sealed has expired (then the next rotation drops them); with
        ``revoke``, they are dropped now: every token issued before is refused. Blocking: the
        file ring's (``rotate_async`` works with any ring)."""
        keys = self._file_ring().rotate_now(now=self._clock(), revoke=revoke)
        assert keys is not None  # no due_before: it always rotates
        return keys.current

    def rotate_if_due(self, period_seconds: float) -> bool:
        """Rotate when the current key is ``period_seconds`` old (True if it did), checked
        under the ring's lock. Blocking: the file ring's (see ``rotate_if_due_async``)."""
        now = self._clock()
        return self._file_ring().rotate_now(now=now, due_before=now - period_seconds) is not None

    async def rotate_async(self, *, revoke: bool = False) -> str:
        """``rotate`` with any ring."""
        keys = await self.ring.rotate(now=self._clock(), revoke=revoke)
        assert keys is not None  # no due_before: it always rotates
        return keys.current

    async def rotate_if_due_async(self, period_seconds: float) -> bool:
        """``rotate_if_due`` with any ring: of several processes rotating on a schedule over
        one ring, one rotates per period (the check is made under the ring's lock)."""
        now = self._clock()
        return await self.ring.rotate(now=now, due_before=now - period_seconds) is not None

    async def keep_rotating(self, period_hours: float) -> None:
        """Rotate every ``period_hours`` (a server task; off at 0). A key rotated by hand
        restarts the period: the age of the current key decides."""
        if period_hours <= 0:
            return
        while True:
            try:
                if await self.rotate_if_due_async(period_hours * 3600):
                    log.info("token key rotated (every %g h)", period_hours)
            except (OSError, ValueError, KeyError, EmbervmError):
                log.exception("scheduled token key rotation failed; retrying later")
            await asyncio.sleep(min(ROTATION_CHECK_SECONDS, period_hours * 3600))

    def _refresh(self) -> None:
        """Pick up a rotation, revocation or deletion done by another process (cheap: the
        ring's ``recheck``)."""
        self._next_check = time.monotonic() + KEY_FILE_RECHECK_SECONDS
        self.ring.recheck()

    def _still_good(self, claims: TokenClaims) -> bool:
        """``current`` for the per-request path: the ring rechecks at most every
        ``KEY_FILE_RECHECK_SECONDS`` (a stat of the key file per request was a fifth of the
        proxy's time)."""
        if time.monotonic() >= self._next_check:
            self._refresh()
        return self._good(claims)

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
        keys = self.ring.loaded
        header = {**_HEADER, "kid": keys.current}
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return jwe.encrypt_compact(header, payload, keys.keys[keys.current])

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
            key_id = header["kid"]
            key = self.ring.loaded.keys[key_id]
            if {k: header.get(k) for k in _HEADER} != _HEADER:
                raise TokenRejected("unexpected algorithm")
            body = json.loads(jwe.decrypt_compact(token, key).plaintext or b"")
            claims = TokenClaims(
                microvm_id=str(body["vm"]),
                kind=str(body["kind"]),
                ports=_decode_ports(body["ports"]),
                expires_at=float(body["exp"]),
                key_id=key_id,
            )
        except TokenRejected:
            raise
        except (JoseError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise TokenRejected(f"undecodable token ({type(exc).__name__})") from exc
        if claims.expires_at <= self._clock():
            raise TokenRejected("expired token")
        return claims

    def current(self, claims: TokenClaims) -> bool:
        """The token is still good: not expired, and the key that sealed it is still loaded
        (not revoked; the ring rechecks first: for the file one ``stat``, cheap enough for
        every open session every few seconds; the store's ring reads nothing here)."""
        self._refresh()
        return self._good(claims)

    def _good(self, claims: TokenClaims) -> bool:
        return claims.expires_at > self._clock() and claims.key_id in self.ring.loaded.keys

    def verify(self, token: str, *, microvm_id: str, port: int, kind: str) -> TokenClaims:
        """The token opens ``port`` of ``microvm_id`` for ``kind`` traffic, or TokenRejected.
        A token decrypted before is checked from memory (claims cannot change); expiry and
        its key (revoked by ``rotate(revoke=True)`` or a deleted key file) are checked every
        time, the ring's ``recheck`` runs at most every ``KEY_FILE_RECHECK_SECONDS``."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self.claims(token)
            if len(self._verified) >= CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = claims
        elif not (  # inline: the usual case (not expired, key loaded, no look at the file due)
            claims.expires_at > self._clock()
            and claims.key_id in self.ring.loaded.keys
            and time.monotonic() < self._next_check
        ) and not self._still_good(claims):
            del self._verified[token]
            raise TokenRejected("expired token or revoked key")
        if claims.microvm_id != microvm_id:
            raise TokenRejected("token for another MicroVM")
        if claims.kind != kind:
            raise TokenRejected(f"{claims.kind} token used for {kind}")
        if not claims.ports.allows(port):
            raise TokenRejected(f"port {port} not allowed by the token")
        return claims


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file from the one loaded (an atomic replace changes the inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)

"""``SecretStore``: the secrets every role of a fleet must share, and nothing about SQL.
``sql_secrets.SqlSecrets`` implements it over the ``secrets`` table.

In a fleet PostgreSQL is the only store every role reaches, so the keys they share live there:

- **the fleet key** (``fleet_key``): 32 random bytes, the tunnel's HMAC key (``tunnel_wire``),
  made on first use, the same for every caller however many race to make it;
- **key rings** (``key_ring``, ``rotate_key_ring``): a named set of keys with one current key,
  older keys retired at a time, and a version that every change bumps. ``TOKEN_KEYS`` holds
  the endpoint and shell tokens' keys: the ``api`` role seals tokens with the current key and
  every ``proxy`` opens them with any key of the ring (core's ``StoreKeyRing``).

Anyone with the database's credentials can read them: the fleet's roles, and nobody else should
have those credentials (docs/SECURITY.md). Secrets are never logged and never in a repr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

FLEET_KEY = "fleet-key"
"""The fleet key's row (``secrets.name``)."""
FLEET_KEY_BYTES = 32
TOKEN_KEYS = "token-keys"  # noqa: S105 (a ring's name, not a secret)
"""The ring of the endpoint and shell tokens' keys."""
MIN_SECRET_BYTES = 32
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
"""A ring's name."""
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
"""A key's id within its ring."""


@dataclass(frozen=True)
class RingKey:
    """One key of a ring. ``retired_at`` None: the current key."""

    key_id: str
    secret: bytes = field(repr=False)
    created_at: datetime
    retired_at: datetime | None


@dataclass(frozen=True)
class KeyRingState:
    """A ring as read: ``version`` (0 before its first key) and its keys, oldest first."""

    version: int
    keys: tuple[RingKey, ...]

    @property
    def current(self) -> RingKey | None:
        """The key to seal with: the newest one not retired (None: the ring has no key yet)."""
        return next((k for k in reversed(self.keys) if k.retired_at is None), None)


def check_ring(ring: str) -> str:
    if NAME_PATTERN.fullmatch(ring) is None or ring == FLEET_KEY:
        raise ValueError(f"bad key ring name {ring!r}")
    return ring


def check_key_id(key_id: str) -> str:
    if KEY_ID_PATTERN.fullmatch(key_id) is None:
        raise ValueError(f"bad key id {key_id!r}")
    return key_id


class SecretStore(Protocol):
    async def fleet_key(self) -> bytes:
        """The fleet's shared tunnel key (``FLEET_KEY_BYTES`` random bytes), created by the
        first caller; every caller, racing or not, gets the same bytes."""
        ...

    async def key_ring_version(self, ring: str) -> int:
        """The ring's version (0 if it has never had a key): one row read, what a process
        polls to notice another's change."""
        ...

    async def key_ring(self, ring: str) -> KeyRingState:
        """The ring's version and keys. The version is read first: the keys are at least as
        new as it, so a reader that keeps the version cannot miss the next change."""
        ...

    async def rotate_key_ring(
        self,
        ring: str,
        key_id: str,
        secret: bytes,
        *,
        now: datetime,
        revoke: bool = False,
        drop_retired_before: datetime | None = None,
        due_before: datetime | None = None,
    ) -> KeyRingState | None:
        """In one transaction, holding the ring's lock (two processes rotating at once never
        lose each other's key): add ``key_id`` as the current key, created ``now``; retire the
        previous current key at ``now`` and drop keys retired at or before
        ``drop_retired_before``, or with ``revoke`` drop every older key; bump the version.
        Returns the ring after. With ``due_before``, only if the ring has no current key or
        its current key was created at or before ``due_before`` (else None: not due, nothing
        changed)."""
        ...

"""The fleet's shared secrets in ``SqlRepository``: the fleet key and key rings (``SecretStore``
in ``secrets.py`` is the interface; table ``schema.secrets``).

**The fleet key** is made race-free on first use: ``INSERT … ON CONFLICT DO NOTHING`` with fresh
random bytes, then a read of the row. Two first callers both insert; PostgreSQL makes the second
wait for the first's commit and then do nothing, and its read (a new snapshot under READ
COMMITTED) sees the first one's bytes. Later calls are one read.

**A key ring** is a head row (``name`` = the ring, ``version``) and one row per key. A change
runs in one transaction that first makes sure the head row exists (``INSERT … ON CONFLICT DO
NOTHING``) and locks it (``SELECT … FOR UPDATE`` on PostgreSQL, like the admission lock;
SQLite serializes its writers anyway), then reads the ring, retires, drops, inserts and bumps
the version. Two processes rotating at once therefore run one after the other: the second sees
the first's key, retires it and keeps it. Readers poll the head row's version (one primary-key
read) and read the keys only when it changed, version first (``key_ring``).

Secrets never reach a log through here: a failed statement's message carries its parameters,
so the ``InternalError`` raised for a failed write has no cause attached (``from None``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.errors import InternalError
from embervm.store.schema import secrets
from embervm.store.secrets import (
    FLEET_KEY,
    FLEET_KEY_BYTES,
    MIN_SECRET_BYTES,
    KeyRingState,
    RingKey,
    SecretStore,
    check_key_id,
    check_ring,
)
from embervm.store.sql_transactions import SqlTransactions


class SqlSecrets(SqlTransactions):
    """``SecretStore`` over the ``secrets`` table (module doc)."""

    def _insert(self) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(secrets)

    @contextlib.asynccontextmanager
    async def _secret_write(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._write(images_unchanged=True) as conn:
                yield conn
        except InternalError as exc:
            # The cause's message would name the statement's parameters: a secret.
            raise InternalError(str(exc)) from None

    async def fleet_key(self) -> bytes:
        query = sa.select(secrets.c.value).where(secrets.c.name == FLEET_KEY)
        async with self._read() as conn:
            value = await conn.scalar(query)
        if value is None:
            create = (
                self._insert()
                .values(
                    name=FLEET_KEY,
                    value=os.urandom(FLEET_KEY_BYTES),
                    created_at=datetime.now(UTC),
                )
                .on_conflict_do_nothing(index_elements=[secrets.c.name])
            )
            async with self._secret_write() as conn:
                await conn.execute(create)
                value = await conn.scalar(query)
        if not isinstance(value, bytes) or len(value) != FLEET_KEY_BYTES:
            raise InternalError("the fleet key in the store is not 32 bytes")
        return value

    async def key_ring_version(self, ring: str) -> int:
        check_ring(ring)
        async with self._read() as conn:
            version = await conn.scalar(sa.select(secrets.c.version).where(secrets.c.name == ring))
        return int(version or 0)

    async def key_ring(self, ring: str) -> KeyRingState:
        check_ring(ring)
        async with self._read() as conn:
            return await _ring_state(conn, ring)

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
        check_ring(ring)
        check_key_id(key_id)
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a ring's key has at least {MIN_SECRET_BYTES} bytes")
        s = secrets.c
        in_ring = s.ring == ring
        async with self._secret_write() as conn:
            await self._lock_ring(conn, ring, now)
            current = (await _ring_state(conn, ring)).current
            if due_before is not None and current is not None and current.created_at > due_before:
                return None
            if revoke:
                await conn.execute(secrets.delete().where(in_ring))
            else:
                await conn.execute(
                    secrets.update().where(in_ring, s.retired_at.is_(None)).values(retired_at=now)
                )
                if drop_retired_before is not None:
                    await conn.execute(
                        secrets.delete().where(in_ring, s.retired_at <= drop_retired_before)
                    )
            await conn.execute(
                secrets.insert().values(
                    name=f"{ring}/{key_id}", value=secret, created_at=now, ring=ring, key_id=key_id
                )
            )
            await conn.execute(secrets.update().where(s.name == ring).values(version=s.version + 1))
            return await _ring_state(conn, ring)

    async def _lock_ring(self, conn: AsyncConnection, ring: str, now: datetime) -> None:
        """Make sure the ring's head row exists, and hold its row lock until the commit."""
        await conn.execute(
            self._insert()
            .values(name=ring, value=b"", created_at=now, version=0)
            .on_conflict_do_nothing(index_elements=[secrets.c.name])
        )
        if self._writer is None:  # SQLite: BEGIN IMMEDIATE and the writer lock serialize
            await conn.execute(
                sa.select(secrets.c.version).where(secrets.c.name == ring).with_for_update()
            )


async def _ring_state(conn: AsyncConnection, ring: str) -> KeyRingState:
    """The version first, then the keys (``SecretStore.key_ring``)."""
    s = secrets.c
    version = await conn.scalar(sa.select(s.version).where(s.name == ring))
    rows = await conn.execute(
        sa.select(s.key_id, s.value, s.created_at, s.retired_at)
        .where(s.ring == ring)
        .order_by(s.created_at, s.name)
    )
    keys = tuple(
        RingKey(key_id=r.key_id, secret=r.value, created_at=r.created_at, retired_at=r.retired_at)
        for r in rows
    )
    return KeyRingState(version=int(version or 0), keys=keys)


def _implements_the_protocol(store: SqlSecrets) -> SecretStore:
    """Never called: mypy checks here that ``SqlSecrets`` is a ``SecretStore``."""
    return store

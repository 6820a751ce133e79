"""The transactions of ``SqlRepository``: one write or read, bounded in time, errors translated.

Every write runs in one transaction (``_write``): on SQLite it holds the in-process writer
lock and begins IMMEDIATE; on PostgreSQL, writers that count (admission, image creation,
deletes) first take the ``admission`` row lock (``_lock_admission``). Database errors and
timeouts become ``InternalError`` here, at the boundary. Idempotency claims are checked and
stored inside the writer's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from embervm.errors import InternalError
from embervm.store.engine import WRITE_OPTION
from embervm.store.records import IdempotencyClaim, ImageRecord, InsertOutcome, VersionRecord
from embervm.store.rowcache import RowCache
from embervm.store.schema import ADMISSION_LOCK, idempotency, locks

DEFAULT_TIMEOUT = 30.0


class Rollback(Exception):
    """Raised inside a write to undo it; carries the outcome to return."""

    def __init__(self, outcome: Any) -> None:
        super().__init__("rollback")
        self.outcome = outcome


def no_seq(record: Any) -> dict[str, Any]:
    """A record's columns, without the ``seq`` the store assigns."""
    values = asdict(record)
    values.pop("seq", None)
    return values


class SqlTransactions:
    """The engine, its transactions and the row caches; ``close()`` disposes of the engine."""

    def __init__(self, engine: AsyncEngine, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.engine = engine
        self._timeout = timeout
        sqlite = engine.dialect.name == "sqlite"
        self._writer = asyncio.Lock() if sqlite else None
        # Only on SQLite is this process the database's only writer (see rowcache).
        self._images: RowCache[tuple[str, str], ImageRecord] | None = None
        self._versions: RowCache[tuple[str, str, int], VersionRecord] | None = None
        if sqlite:
            self._images, self._versions = RowCache(), RowCache()

    async def close(self) -> None:
        await self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _write(self, *, images_unchanged: bool = False) -> AsyncIterator[AsyncConnection]:
        """One write transaction; unless ``images_unchanged``, it drops the cached image and
        version rows once it has ended (committed or not)."""
        try:
            async with asyncio.timeout(self._timeout):
                async with contextlib.AsyncExitStack() as stack:
                    if self._writer is not None:
                        await stack.enter_async_context(self._writer)
                    conn = await stack.enter_async_context(self.engine.connect())
                    conn = await conn.execution_options(**{WRITE_OPTION: True})
                    await stack.enter_async_context(conn.begin())
                    yield conn
        except TimeoutError as exc:
            raise InternalError("the database did not answer in time") from exc
        except Rollback:
            raise
        except SQLAlchemyError as exc:
            raise InternalError("the database failed") from exc
        finally:
            if not images_unchanged and self._images is not None and self._versions is not None:
                self._images.invalidate()
                self._versions.invalidate()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with asyncio.timeout(self._timeout), self.engine.connect() as conn:
                yield conn
        except TimeoutError as exc:
            raise InternalError("the database did not answer in time") from exc
        except SQLAlchemyError as exc:
            raise InternalError("the database failed") from exc

    async def _lock_admission(self, conn: AsyncConnection) -> None:
        if self._writer is not None:  # SQLite: BEGIN IMMEDIATE and the writer lock serialize
            return
        await conn.execute(
            sa.select(locks.c.name).where(locks.c.name == ADMISSION_LOCK).with_for_update()
        )

    async def _check_claim(
        self, conn: AsyncConnection, claim: IdempotencyClaim | None
    ) -> InsertOutcome | None:
        if claim is None:
            return None
        row = (
            await conn.execute(
                sa.select(idempotency.c.request_hash, idempotency.c.resource_id).where(
                    idempotency.c.account_id == claim.account_id,
                    idempotency.c.scope == claim.scope,
                    idempotency.c.client_token == claim.client_token,
                )
            )
        ).first()
        if row is None:
            return None
        if row.request_hash == claim.request_hash:
            return InsertOutcome("replayed", row.resource_id)
        return InsertOutcome("token_reused", row.resource_id)

    async def _insert_claim(
        self, conn: AsyncConnection, claim: IdempotencyClaim | None, created_at: Any
    ) -> None:
        if claim is not None:
            await conn.execute(idempotency.insert().values(**asdict(claim), created_at=created_at))

"""Engines and migrations: SQLite (WAL) by default, PostgreSQL (asyncpg) by URL.

SQLite: WAL with ``synchronous=FULL`` (an answered write survives a power loss). One writer
at a time is the database's own rule; we make it explicit instead of letting concurrent
writers fail with "database is locked". Write transactions start with
``BEGIN IMMEDIATE`` (the write lock is taken up front, so a read-then-write transaction can
never be refused half-way) and the repository also serializes its writers in-process; reads
(one statement each) run in autocommit, in parallel under WAL. PostgreSQL: ordinary
transactions, conditional UPDATEs and a row lock for admission (see ``schema.locks``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from embervm.errors import ConfigError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
WRITE_OPTION = "embervm_write"
SQLITE_BUSY_TIMEOUT_MS = 10_000
MIGRATION_TIMEOUT = 120.0


def normalize_url(url: str) -> str:
    """Accept plain ``sqlite:///`` and ``postgresql://`` URLs and pick the async drivers."""
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url[len("sqlite://") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for ``url`` with the SQLite write discipline installed."""
    url = normalize_url(url)
    if url.startswith("sqlite+aiosqlite://"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        _install_sqlite_hooks(engine)
        return engine
    if url.startswith("postgresql+asyncpg://"):
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        kwargs.setdefault("pool_pre_ping", True)
        return create_async_engine(url, **kwargs)
    raise ConfigError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves (pysqlite's implicit transactions defer too long).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL, not NORMAL: with NORMAL a WAL commit is not fsynced, so after a power loss the
        # last transactions roll back although the API answered them (a VM created or deleted
        # "again"). FULL fsyncs the WAL once per write transaction: ~1.2 ms here, in
        # aiosqlite's thread, against ~0.02 ms; control-plane writes are a few per API call.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Reads are single statements, atomic on their own: no BEGIN (one round trip less).
        if conn.get_execution_options().get(WRITE_OPTION, False):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (start-up runs this with ``head``)."""
    async with asyncio.timeout(MIGRATION_TIMEOUT):
        async with engine.connect() as conn:
            conn = await conn.execution_options(**{WRITE_OPTION: True})
            await conn.run_sync(lambda c: command.upgrade(_alembic_config(c), revision))
            await conn.commit()


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    async with asyncio.timeout(MIGRATION_TIMEOUT):
        async with engine.connect() as conn:
            conn = await conn.execution_options(**{WRITE_OPTION: True})
            await conn.run_sync(lambda c: command.downgrade(_alembic_config(c), revision))
            await conn.commit()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())

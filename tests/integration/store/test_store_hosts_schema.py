"""The migrations create exactly ``schema.metadata`` (on SQLite and PostgreSQL), and r0002 (the
fleet's hosts) goes down to r0001 and up again without losing a MicroVM row."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from embervm.store import SqlRepository
from embervm.store.engine import create_engine, current_revision, downgrade, migrate
from embervm.store.schema import metadata


def _differences(connection: sa.Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_the_migrated_database_is_the_metadata(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine, "head")
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "hosts" in tables
    finally:
        await engine.dispose()


async def test_r0002_goes_down_and_up_keeping_the_microvms(
    database_url: str, repo: SqlRepository, place_vm: Any
) -> None:
    await repo.register("h1", "10.0.0.5:8790", 1, 4096, {}, 60.0)
    vm = await place_vm("mvm-1", "h1", 1)
    await repo.engine.dispose()  # the repository's pooled connections hold the old tables
    engine = create_engine(database_url)
    try:
        await downgrade(engine, "0001")
        assert await current_revision(engine) == "0001"
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in sa.inspect(c).get_columns("microvms")}
            )
            ids = (await conn.execute(sa.text("SELECT microvm_id FROM microvms"))).scalars().all()
        assert "hosts" not in tables
        assert "host_epoch" not in columns
        assert ids == ["mvm-1"]
        await migrate(engine, "head")
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()
    back = await repo.get_microvm("mvm-1")
    assert back is not None
    assert back.microvm_id == vm.microvm_id
    assert back.host_epoch is None

"""The fleet's shared secrets on SQLite and PostgreSQL: the fleet key made once under a race,
key rings rotated under the ring's lock (two at once lose no key), the version every change
bumps, secrets kept out of reprs and error tracebacks, and r0003 down and up."""

from __future__ import annotations

import asyncio
import os
import traceback
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import embervm.store.sql_secrets as sql_secrets
from embervm.errors import InternalError
from embervm.store import TOKEN_KEYS, SqlRepository, open_repository
from embervm.store.engine import create_engine, current_revision, downgrade, migrate
from embervm.store.schema import secrets

T0 = datetime(2027, 1, 1, tzinfo=UTC)


@pytest.fixture
async def processes(database_url: str, repo: SqlRepository) -> AsyncIterator[list[SqlRepository]]:
    """Five more repositories on the test's database: five processes of a fleet."""
    others = [await open_repository(database_url, migrate_to=None) for _ in range(5)]
    try:
        yield others
    finally:
        for other in others:
            await other.close()


async def rotate(repo: SqlRepository, key_id: str, at: datetime = T0, **options: Any) -> Any:
    return await repo.rotate_key_ring(TOKEN_KEYS, key_id, os.urandom(32), now=at, **options)


async def test_the_fleet_key_is_made_once_by_racing_processes(
    repo: SqlRepository, processes: list[SqlRepository]
) -> None:
    keys = await asyncio.gather(*(p.fleet_key() for p in processes))
    assert len(keys[0]) == 32
    assert set(keys) == {keys[0]}
    assert await repo.fleet_key() == keys[0]  # and later calls read it
    async with repo.engine.connect() as conn:
        names = (await conn.scalars(sa.select(secrets.c.name))).all()
    assert names == ["fleet-key"]


async def test_an_empty_ring_and_a_rotation_bump_the_version(repo: SqlRepository) -> None:
    assert await repo.key_ring_version(TOKEN_KEYS) == 0
    empty = await repo.key_ring(TOKEN_KEYS)
    assert (empty.version, empty.keys, empty.current) == (0, (), None)
    first = await rotate(repo, "k1")
    assert first.version == 1
    assert first.current is not None
    assert (first.current.key_id, first.current.created_at) == ("k1", T0)
    assert await repo.key_ring_version(TOKEN_KEYS) == 1
    second = await rotate(repo, "k2", T0 + timedelta(seconds=5))
    assert second.version == 2
    assert [(k.key_id, k.retired_at) for k in second.keys] == [
        ("k1", T0 + timedelta(seconds=5)), ("k2", None),
    ]  # fmt: skip
    assert await repo.key_ring(TOKEN_KEYS) == second


async def test_retired_keys_are_dropped_after_their_time_and_revoke_drops_them_all(
    repo: SqlRepository,
) -> None:
    await rotate(repo, "k1")
    await rotate(repo, "k2", T0 + timedelta(minutes=1))  # k1 retired at +1 min
    kept = await rotate(
        repo, "k3", T0 + timedelta(minutes=2), drop_retired_before=T0 + timedelta(seconds=30)
    )
    assert [k.key_id for k in kept.keys] == ["k1", "k2", "k3"]
    dropped = await rotate(
        repo, "k4", T0 + timedelta(minutes=3), drop_retired_before=T0 + timedelta(minutes=1)
    )
    assert [k.key_id for k in dropped.keys] == ["k2", "k3", "k4"]
    revoked = await rotate(repo, "k5", T0 + timedelta(minutes=4), revoke=True)
    assert [(k.key_id, k.retired_at) for k in revoked.keys] == [("k5", None)]
    assert revoked.version == 5


async def test_a_rotation_that_is_not_due_changes_nothing(repo: SqlRepository) -> None:
    assert await rotate(repo, "k1", due_before=T0) is not None  # an empty ring is always due
    assert await rotate(repo, "k2", T0 + timedelta(hours=1), due_before=T0 - timedelta(1)) is None
    assert await repo.key_ring_version(TOKEN_KEYS) == 1
    due = await rotate(repo, "k3", T0 + timedelta(hours=24), due_before=T0)  # made at T0: due
    assert due is not None
    assert due.current is not None
    assert due.current.key_id == "k3"


async def test_two_processes_rotating_at_once_keep_both_keys(
    repo: SqlRepository, processes: list[SqlRepository], monkeypatch: pytest.MonkeyPatch
) -> None:
    await rotate(repo, "k0")
    real = sql_secrets._ring_state

    async def slow_read(conn: Any, ring: str) -> Any:  # both would read before either writes
        state = await real(conn, ring)
        await asyncio.sleep(0.3)
        return state

    monkeypatch.setattr(sql_secrets, "_ring_state", slow_read)
    a, b = processes[:2]
    at = T0 + timedelta(minutes=1)
    await asyncio.gather(rotate(a, "ka", at), rotate(b, "kb", at))
    monkeypatch.undo()
    ring = await repo.key_ring(TOKEN_KEYS)
    assert sorted(k.key_id for k in ring.keys) == ["k0", "ka", "kb"]
    assert [k.key_id for k in ring.keys if k.retired_at is None] == [ring.current.key_id]  # type: ignore[union-attr]
    assert ring.version == 3


async def test_secrets_stay_out_of_reprs_and_error_tracebacks(repo: SqlRepository) -> None:
    secret = os.urandom(32)
    ring = await repo.rotate_key_ring(TOKEN_KEYS, "k1", secret, now=T0)
    assert ring is not None
    for shown in (repr(ring), repr(ring.keys[0]), str(ring)):
        assert repr(secret) not in shown
        assert secret.hex() not in shown
    again = os.urandom(32)
    with pytest.raises(InternalError) as failed:  # the same key id twice: a unique violation
        await repo.rotate_key_ring(TOKEN_KEYS, "k1", again, now=T0 + timedelta(seconds=1))
    told = "".join(traceback.format_exception(failed.value))
    assert "database" in told
    for leaked in (repr(again), again.hex(), repr(secret)):
        assert leaked not in told
    assert (await repo.key_ring(TOKEN_KEYS)) == ring  # rolled back


async def test_r0003_goes_down_and_up(database_url: str, repo: SqlRepository) -> None:
    await repo.fleet_key()
    await repo.engine.dispose()
    engine = create_engine(database_url)
    try:
        await downgrade(engine, "0002")
        assert await current_revision(engine) == "0002"
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "secrets" not in tables
        assert "hosts" in tables
        await migrate(engine, "head")
    finally:
        await engine.dispose()
    assert len(await repo.fleet_key()) == 32  # a new one: the old table is gone

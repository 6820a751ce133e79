"""``TokenAuthority`` over ``StoreKeyRing`` on SQLite and PostgreSQL, as a fleet runs it: two
processes (two repositories on one database) share the token keys. A token one seals the other
opens; a rotation or revocation by one is seen by the other within the recheck; two rotating at
once keep both keys; the proxy's path reads no row per request; an unreachable store leaves the
loaded keys serving, said once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from embervm.contracts import PortGrant
from embervm.core.keyring_store import StoreKeyRing
from embervm.core.tokens import KEY_FILE_RECHECK_SECONDS, TokenAuthority, TokenRejected
from embervm.errors import InternalError
from embervm.store import TOKEN_KEYS, SqlRepository, open_repository

VM = "mvm-0123456789abcdef0123"
SEEN_WITHIN = KEY_FILE_RECHECK_SECONDS + 0.5  # the poll period, and its round trips


class Fleet:
    """Two processes: each its own repository, ring and authority, on one database."""

    def __init__(self) -> None:
        self.repos: list[SqlRepository] = []
        self.rings: list[StoreKeyRing] = []
        self.authorities: list[TokenAuthority] = []

    async def start(self, database_url: str, count: int = 2) -> None:
        self.repos = [await open_repository(database_url, migrate_to=None) for _ in range(count)]
        self.rings = list(await asyncio.gather(*(StoreKeyRing.open(r) for r in self.repos)))
        self.authorities = [TokenAuthority(ring) for ring in self.rings]

    async def stop(self) -> None:
        for ring in self.rings:
            await ring.close()
        for repo in self.repos:
            await repo.close()


@pytest.fixture
async def fleet(database_url: str, repo: SqlRepository) -> AsyncIterator[Fleet]:
    # ``repo`` migrated the database; the fleet's processes open it as it is.
    started = Fleet()
    try:
        await started.start(database_url)
        yield started
    finally:
        await started.stop()


def seal(authority: TokenAuthority) -> str:
    return authority.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                           expires_in_minutes=60)  # fmt: skip


def opens(authority: TokenAuthority, token: str) -> Any:
    return authority.verify(token, microvm_id=VM, port=8080, kind="endpoint")


async def until(condition: Any, within: float) -> float:
    """Seconds until ``condition()`` held (fails the test after ``within``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, "not seen in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_processes_racing_to_open_an_empty_ring_make_one_key(
    database_url: str, repo: SqlRepository
) -> None:
    fleet = Fleet()
    try:
        await fleet.start(database_url, count=5)
        assert len({ring.loaded.current for ring in fleet.rings}) == 1
        assert len((await repo.key_ring(TOKEN_KEYS)).keys) == 1
    finally:
        await fleet.stop()


async def test_a_token_sealed_by_one_process_opens_in_another(fleet: Fleet) -> None:
    api, proxy = fleet.authorities
    claims = opens(proxy, seal(api))
    assert claims.microvm_id == VM
    assert proxy.current(claims)
    assert api.keys_file is None
    with pytest.raises(TypeError, match="rotate_async"):
        api.rotate()  # blocking rotation is the file's


async def test_a_rotation_by_one_is_seen_by_the_other_within_the_recheck(fleet: Fleet) -> None:
    api, proxy = fleet.authorities
    old = seal(api)
    opens(proxy, old)
    new_kid = await api.rotate_async()
    assert api.ring.loaded.current == new_kid  # at once where it was made
    waited = await until(lambda: proxy.ring.loaded.current == new_kid, SEEN_WITHIN)
    assert waited <= SEEN_WITHIN
    assert opens(proxy, seal(api)).key_id == new_kid
    assert seal(proxy).count(".") == 4
    opens(proxy, old)  # a rotation cuts nobody off
    opens(api, old)


async def test_a_revocation_by_one_makes_the_other_refuse_old_tokens(fleet: Fleet) -> None:
    api, proxy = fleet.authorities
    old = seal(api)
    claims = opens(proxy, old)  # cached by the proxy
    assert proxy.current(claims)
    await api.rotate_async(revoke=True)
    with pytest.raises(TokenRejected):
        opens(api, old)
    await until(lambda: not proxy.current(claims), SEEN_WITHIN)
    with pytest.raises(TokenRejected):
        opens(proxy, old)
    opens(proxy, seal(api))


async def test_two_processes_rotating_at_once_keep_both_keys(fleet: Fleet) -> None:
    first = fleet.rings[0].loaded.current
    a, b = await asyncio.gather(*(auth.rotate_async() for auth in fleet.authorities))
    ring = await fleet.repos[0].key_ring(TOKEN_KEYS)
    assert {k.key_id for k in ring.keys} == {first, a, b}
    assert ring.current is not None
    assert ring.current.key_id in {a, b}
    assert [k.key_id for k in ring.keys if k.retired_at is None] == [ring.current.key_id]
    for authority in fleet.authorities:
        await until(lambda a=authority: a.ring.loaded.current == ring.current.key_id, SEEN_WITHIN)  # type: ignore[misc, union-attr]
        assert set(authority.ring.loaded.keys) == {first, a, b}


async def test_of_processes_rotating_on_a_schedule_one_rotates_per_period(fleet: Fleet) -> None:
    def an_hour_later() -> float:
        return time.time() + 3600

    # The first key (made now) is half an hour overdue; a key made by either is not.
    later = [TokenAuthority(ring, clock=an_hour_later) for ring in fleet.rings]
    done = await asyncio.gather(*(a.rotate_if_due_async(1800.0) for a in later))
    assert sorted(done) == [False, True]
    assert len((await fleet.repos[0].key_ring(TOKEN_KEYS)).keys) == 2


async def test_verifying_reads_no_row_per_request(fleet: Fleet) -> None:
    api, proxy = fleet.authorities
    token = seal(api)
    claims = opens(proxy, token)
    statements: list[str] = []
    engine = fleet.repos[1].engine.sync_engine

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        checks, started = 0, time.monotonic()
        while time.monotonic() - started < 2.5 * KEY_FILE_RECHECK_SECONDS:
            for _ in range(50):
                opens(proxy, token)
                assert proxy.current(claims)
                checks += 1
            await asyncio.sleep(0.005)  # the poll task runs meanwhile
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert checks >= 1000
    assert 1 <= len(statements) <= 3  # the ring's polls: one version read a second


async def test_an_unreachable_store_leaves_the_loaded_keys_serving_and_is_said_once(
    repo: SqlRepository, caplog: pytest.LogCaptureFixture
) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.down = False
            self.polls = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(repo, name)

        async def key_ring_version(self, ring: str) -> int:
            self.polls += 1
            if self.down:
                raise InternalError("the database did not answer in time")
            return await repo.key_ring_version(ring)

    store = Flaky()
    ring = await StoreKeyRing.open(store, recheck_seconds=0.05)  # type: ignore[arg-type]
    try:
        authority = TokenAuthority(ring)
        token = seal(authority)
        claims = opens(authority, token)
        store.down = True
        caplog.set_level(logging.INFO, logger="embervm.tokens")
        polls = store.polls
        await until(lambda: store.polls >= polls + 4, 2.0)
        assert opens(authority, token) == claims
        assert authority.current(claims)
        assert opens(authority, seal(authority)).key_id == claims.key_id
        said = [r for r in caplog.records if r.name == "embervm.tokens"]
        assert len(said) == 1
        assert said[0].levelno == logging.WARNING
        assert "serving with the keys loaded last" in said[0].getMessage()
        store.down = False
        await until(lambda: len(caplog.records) >= 2, 2.0)
        assert "again" in caplog.records[-1].getMessage()
    finally:
        await ring.close()

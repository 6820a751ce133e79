"""Wake-ups between a fleet's API processes and hosts (``NOTIFY``/``LISTEN``): a host hears its
own id and no other, hears again after PostgreSQL restarted, and on SQLite (one process) both
sides are no-ops. A wake-up is only ever a hint: hosts also poll (core's ``keep_adopting``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from tests.framework.local_services import service_root, started_postgres

from embervm.localfleet import LocalPostgres
from embervm.store import SqlRepository, open_repository


async def heard_within(event: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def test_a_host_hears_its_own_wake_ups_only(database_url: str, repo: SqlRepository) -> None:
    listener = await open_repository(database_url)
    h1, h2 = asyncio.Event(), asyncio.Event()
    try:
        async with (
            listener.listening_for_work("h1", h1.set),
            listener.listening_for_work("h2", h2.set),
        ):
            if repo.engine.dialect.name == "sqlite":
                await repo.wake_host("h1")
                assert not await heard_within(h1, 0.3)  # one process: nothing to wake
                return
            assert await heard_within(h1, 5.0)  # one look after (re)connecting
            assert await heard_within(h2, 5.0)
            h1.clear()
            h2.clear()
            await repo.wake_host("h1")
            assert await heard_within(h1, 5.0)
            assert not await heard_within(h2, 0.5)
    finally:
        await listener.close()


@pytest.fixture
def restartable_postgres() -> Iterator[LocalPostgres]:
    """A PostgreSQL of the test's own (the shared test server must not be restarted)."""
    with service_root("embervm-wakeups-") as root, started_postgres(root) as pg:
        yield pg


async def test_listening_survives_a_postgresql_restart(
    restartable_postgres: LocalPostgres,
) -> None:
    pg = restartable_postgres
    sender = await open_repository(pg.url)
    listener = await open_repository(pg.url)
    woken = asyncio.Event()
    try:
        async with listener.listening_for_work("h1", woken.set):
            assert await heard_within(woken, 5.0)
            woken.clear()
            await asyncio.to_thread(pg.restart, "immediate")
            assert await heard_within(woken, 15.0)  # the look after reconnecting
            woken.clear()
            for _ in range(20):  # the sender's pool reconnects (pre-ping) too
                await sender.wake_host("h1")
                if await heard_within(woken, 0.5):
                    break
            assert woken.is_set()
    finally:
        await sender.close()
        await listener.close()

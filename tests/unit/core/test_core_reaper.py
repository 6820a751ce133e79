"""The reaper over a real (SQLite) store: a host whose lease ran out is marked LOST once and its
running VM TERMINATED with the lost-host reason; the loop survives a store that fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embervm.core.reaper import keep_reaping, reap_once
from embervm.store import HostRecord, SqlRepository, open_repository


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[SqlRepository]:
    repository = await open_repository(f"sqlite+aiosqlite:///{tmp_path / 'embervm.db'}")
    try:
        yield repository
    finally:
        await repository.close()


async def register(repo: SqlRepository, host_id: str, lease: float) -> HostRecord:
    return await repo.register(host_id, f"{host_id}.fleet:8790", 1, 8192, {}, lease)


async def test_a_host_past_its_lease_is_reaped_once_and_a_live_one_never(
    repo: SqlRepository, caplog: pytest.LogCaptureFixture
) -> None:
    await register(repo, "h1", lease=0.2)
    await register(repo, "h2", lease=60.0)
    await asyncio.sleep(0.4)
    with caplog.at_level(logging.WARNING, logger="embervm.core.reaper"):
        assert [h.host_id for h in await reap_once(repo)] == ["h1"]
        assert await reap_once(repo) == []
    assert "host h1 (epoch 1) stopped answering" in caplog.text
    states = {h.host_id: h.state for h in await repo.list_hosts()}
    assert states == {"h1": "LOST", "h2": "ACTIVE"}


class FailingOnce:
    def __init__(self, repo: SqlRepository) -> None:
        self.repo = repo
        self.calls = 0

    async def mark_lost_expired(self) -> list[HostRecord]:
        self.calls += 1
        if self.calls == 1:
            raise OSError("the store is down")
        return await self.repo.mark_lost_expired()


async def test_the_loop_goes_on_after_the_store_failed(repo: SqlRepository) -> None:
    await register(repo, "h1", lease=0.05)
    flaky = FailingOnce(repo)
    loop = asyncio.create_task(keep_reaping(flaky, interval=0.05))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while (host := await repo.get_host("h1")) is None or host.state != "LOST":  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert flaky.calls >= 2


class Builds:
    def __init__(self) -> None:
        self.failed: list[list[str]] = []

    async def fail_builds_of(self, host_ids: list[str]) -> None:
        self.failed.append(list(host_ids))


async def test_the_builds_of_reaped_hosts_fail(repo: SqlRepository) -> None:
    await register(repo, "h1", lease=0.05)
    await register(repo, "h2", lease=60.0)
    builds = Builds()
    loop = asyncio.create_task(keep_reaping(repo, interval=0.05, builds=builds))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):
            while not builds.failed:  # noqa: ASYNC110 - the fake records the call
                await asyncio.sleep(0.02)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert builds.failed == [["h1"]]

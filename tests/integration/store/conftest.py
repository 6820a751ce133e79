"""Fixtures of the store's tests on a real database: every test runs on SQLite (a file in its
tmp dir) and on PostgreSQL (a fresh database of one throw-away server per session)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from tests.framework.pg_server import postgres_server

from embervm.store import MicrovmRecord, SqlRepository, open_repository
from embervm.store.schema import microvms, usage


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of its own for the test (not migrated)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'embervm.db'}"
        return
    server: str = request.getfixturevalue("postgres_url")
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield server.rsplit("/", 1)[0] + f"/{name}"
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture
async def repo(database_url: str) -> AsyncIterator[SqlRepository]:
    """The store at head, as one process sees it."""
    repository = await open_repository(database_url)
    try:
        yield repository
    finally:
        await repository.close()


PlaceVm = Callable[..., Awaitable[MicrovmRecord]]


@pytest.fixture
def place_vm(repo: SqlRepository) -> PlaceVm:
    """Write a MicroVM row placed on a host as placement will (``host_id``, ``host_epoch``),
    with its usage row: ``await place_vm("mvm-1", "h1", 1, state="RUNNING")``."""

    async def place(
        microvm_id: str, host_id: str, host_epoch: int | None, *, state: str = "RUNNING",
        memory_mib: int = 1024, **values: Any,
    ) -> MicrovmRecord:  # fmt: skip
        now = datetime.now(UTC)
        vm = MicrovmRecord(
            microvm_id=microvm_id, account_id="123456789012", image_name="web",
            image_arn="arn:aws:lambda:us-east-1:123456789012:microvm-image:web",
            image_version="1", state=state, endpoint=f"{microvm_id}.microvm.localhost",
            memory_mib=memory_mib, vcpus=1, maximum_duration_seconds=28800, started_at=now,
            updated_at=now, expires_at=now + timedelta(hours=8), host_id=host_id,
            host_epoch=host_epoch, address="10.213.0.2", running_since=now, **values,
        )  # fmt: skip
        columns = dataclasses.asdict(vm)
        columns.pop("seq")
        async with repo.engine.begin() as conn:
            await conn.execute(microvms.insert().values(**columns))
            await conn.execute(usage.insert().values(
                microvm_id=microvm_id, vcpu_seconds=1.5, gib_seconds=2.5,
                snapshot_bytes_written=7, snapshot_bytes_read=3,
            ))  # fmt: skip
        found = await repo.get_microvm(microvm_id)
        assert found is not None
        return found

    return place

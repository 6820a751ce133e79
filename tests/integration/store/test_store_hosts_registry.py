"""The fleet's host rows on SQLite and PostgreSQL: epochs per registration, heartbeats that
only the current epoch may make, leases from the database's clock, drain."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from embervm.store import HostRecord, SqlRepository

CAPS = {"qemu": "8.2.2", "accelerator": "kvm", "cpu": "AMD EPYC 7B13"}


async def register(
    repo: SqlRepository, host_id: str = "h1", *, lease: float = 30.0,
    address: str = "10.0.0.5:8790", pid: int = 4242,
) -> HostRecord:  # fmt: skip
    return await repo.register(host_id, address, pid, 16384, CAPS, lease)


async def test_each_registration_bumps_the_epoch_and_a_heartbeat_needs_the_current_one(
    repo: SqlRepository,
) -> None:
    first = await register(repo)
    assert (first.epoch, first.state, first.memory_reserved_mib) == (1, "ACTIVE", 0)
    assert first.capabilities == CAPS
    beat = await repo.heartbeat("h1", 1, 30.0, 2048)
    assert beat is not None
    assert beat.memory_reserved_mib == 2048

    second = await register(repo, address="10.0.0.6:8791", pid=4343)
    assert (second.epoch, second.state) == (2, "ACTIVE")
    assert (second.address, second.pid) == ("10.0.0.6:8791", 4343)
    assert second.memory_reserved_mib == 2048  # kept until the next heartbeat reports it
    assert await repo.heartbeat("h1", 1, 30.0, 0) is None  # superseded
    assert (await repo.get_host("h1")) == second  # and the stale heartbeat wrote nothing
    assert await repo.heartbeat("h1", 2, 30.0, 512) is not None
    assert await repo.heartbeat("nobody", 1, 30.0, 0) is None


async def test_the_lease_is_counted_on_the_database_clock(repo: SqlRepository) -> None:
    host = await register(repo, lease=45.0)
    assert host.registered_at == host.heartbeat_at  # one reading of the database's clock
    assert host.lease_expires_at - host.heartbeat_at == timedelta(seconds=45)
    beat = await repo.heartbeat("h1", host.epoch, 2.5, 0)
    assert beat is not None
    assert beat.lease_expires_at - beat.heartbeat_at == timedelta(seconds=2.5)
    assert beat.heartbeat_at >= host.heartbeat_at
    assert beat.registered_at == host.registered_at


async def test_a_draining_host_that_restarts_stays_draining(repo: SqlRepository) -> None:
    await register(repo)
    await register(repo, "h2")
    drained = await repo.drain("h1")
    assert drained is not None
    assert (drained.state, drained.epoch) == ("DRAINING", 1)
    again = await register(repo)
    assert (again.state, again.epoch) == ("DRAINING", 2)
    beat = await repo.heartbeat("h1", 2, 30.0, 0)
    assert beat is not None
    assert beat.state == "DRAINING"
    assert [(h.host_id, h.state) for h in await repo.list_hosts()] == [
        ("h1", "DRAINING"), ("h2", "ACTIVE"),
    ]  # fmt: skip
    assert await repo.drain("nobody") is None
    assert await repo.get_host("nobody") is None


async def test_a_heartbeat_after_the_lease_but_before_any_reaper_renews_it(
    repo: SqlRepository,
) -> None:
    host = await register(repo, lease=0.05)
    await asyncio.sleep(0.3)
    # Expired on the database's clock, but nobody marked it: it may still renew.
    beat = await repo.heartbeat("h1", host.epoch, 60.0, 0)
    assert beat is not None
    assert beat.state == "ACTIVE"
    assert await repo.mark_lost_expired() == []

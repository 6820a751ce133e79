"""Hosts that miss their lease, on SQLite and PostgreSQL: marked LOST once (however many
reapers race), their VMs settled in the same transaction, and nothing they write afterwards
lands."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import sqlalchemy as sa

from embervm.store import AdmissionLimits, HostFence, HostRecord, SqlRepository, open_repository
from embervm.store.engine import create_engine
from embervm.store.schema import hosts

CAPS = {"qemu": "8.2.2", "accelerator": "kvm", "cpu": "host"}
SHORT = 1.0  # seconds of lease a test waits out
STATE_REASON = re.compile(r"[^\s]+")  # the model's pattern of stateReason (docs/API.md)


async def register(repo: SqlRepository, host_id: str, lease: float = 60.0) -> HostRecord:
    return await repo.register(host_id, f"{host_id}.fleet:8790", 100, 8192, CAPS, lease)


async def expire(repo: SqlRepository, *host_ids: str) -> None:
    """Let the hosts' leases run out on the database's clock: a SHORT lease, waited out."""
    for host_id in host_ids:
        host = await repo.get_host(host_id)
        assert host is not None
        assert await repo.heartbeat(host_id, host.epoch, SHORT, host.memory_reserved_mib)
    assert await repo.mark_lost_expired() == []  # not yet
    await asyncio.sleep(SHORT + 0.2)


async def test_a_host_is_lost_only_once_its_lease_has_passed_on_the_database_clock(
    repo: SqlRepository,
) -> None:
    await register(repo, "h1")
    await register(repo, "h2")
    await expire(repo, "h1")
    lost = await repo.mark_lost_expired()
    assert [(h.host_id, h.state, h.epoch) for h in lost] == [("h1", "LOST", 1)]
    assert await repo.mark_lost_expired() == []  # marked once
    assert [(h.host_id, h.state) for h in await repo.list_hosts()] == [
        ("h1", "LOST"), ("h2", "ACTIVE"),
    ]  # fmt: skip


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_database_clock_judges_the_lease_not_the_callers(
    database_url: str, repo: SqlRepository
) -> None:
    """A reaper whose session sees the database's clock two hours ahead marks a host whose
    lease has ten minutes left by every other clock here (this process's included): only
    ``now()`` in the database counts. (PostgreSQL only: SQLite serves one machine.)"""
    async with repo.engine.begin() as conn:
        await conn.execute(sa.text("CREATE SCHEMA skewed"))
        await conn.execute(sa.text(
            "CREATE FUNCTION skewed.now() RETURNS timestamptz LANGUAGE sql STABLE"
            " AS $$ SELECT pg_catalog.now() + interval '2 hours' $$"
        ))  # fmt: skip
    await register(repo, "h1", lease=600.0)
    assert await repo.mark_lost_expired() == []
    settings = {"search_path": "skewed, public, pg_catalog"}  # skewed.now() before the real one
    ahead = SqlRepository(create_engine(database_url, connect_args={"server_settings": settings}))
    try:
        assert [h.host_id for h in await ahead.mark_lost_expired()] == ["h1"]
    finally:
        await ahead.close()


async def test_reapers_that_race_mark_each_host_once(
    database_url: str, repo: SqlRepository
) -> None:
    names = [f"h{i}" for i in range(6)]
    for name in names:
        await register(repo, name)
    await expire(repo, *names)
    # Three API processes' reapers. On PostgreSQL the rows are held locked until all three
    # have sent their statements, so they really contend (a read-then-write reaper would
    # mark the hosts three times).
    others = [await open_repository(database_url) for _ in range(2)]
    try:
        reapers = [repo, *others]
        if repo.engine.dialect.name == "postgresql":
            async with repo.engine.connect() as holder, holder.begin():
                await holder.execute(sa.select(hosts.c.host_id).with_for_update())
                tasks = [asyncio.create_task(r.mark_lost_expired()) for r in reapers]
                await asyncio.sleep(0.5)
                assert not any(t.done() for t in tasks)
            results = await asyncio.gather(*tasks)
        else:
            results = await asyncio.gather(*(r.mark_lost_expired() for r in reapers))
    finally:
        for other in others:
            await other.close()
    marked = [h.host_id for result in results for h in result]
    assert sorted(marked) == names  # every host, each by exactly one reaper


async def test_the_vms_of_a_lost_host_end_or_wait_suspended_for_another_host(
    repo: SqlRepository, place_vm: Any
) -> None:
    await register(repo, "h1")
    await register(repo, "h2")
    live = {"PENDING": "mvm-p", "RUNNING": "mvm-r", "SUSPENDING": "mvm-s",
            "TERMINATING": "mvm-t"}  # fmt: skip
    for state, vm_id in live.items():
        await place_vm(vm_id, "h1", 1, state=state)
    before_suspended = await place_vm("mvm-z", "h1", 1, state="SUSPENDED",
                                      snapshot_dir="s3://snaps/mvm-z")  # fmt: skip
    ended = await place_vm("mvm-e", "h1", 1, state="TERMINATED", state_reason="UserRequest")
    elsewhere = await place_vm("mvm-b", "h2", 1)
    await expire(repo, "h1")

    assert [h.host_id for h in await repo.mark_lost_expired()] == ["h1"]
    for vm_id in live.values():
        vm = await repo.get_microvm(vm_id)
        assert vm is not None
        assert vm.state == "TERMINATED"
        assert vm.state_reason == "HostLost:the_host_h1_stopped_answering"
        assert STATE_REASON.fullmatch(vm.state_reason)
        assert vm.terminated_at is not None
        assert (vm.address, vm.running_since, vm.host_epoch) == (None, None, None)
        usage = await repo.get_usage(vm_id)
        assert (usage.vcpu_seconds, usage.gib_seconds) == (1.5, 2.5)  # not metered, not lost
        assert (usage.snapshot_bytes_written, usage.snapshot_bytes_read) == (7, 3)
    suspended = await repo.get_microvm("mvm-z")
    assert suspended is not None
    assert suspended.state == "SUSPENDED"
    assert suspended.snapshot_dir == before_suspended.snapshot_dir
    assert suspended.host_id == "h1"  # the last host: a placement preference
    assert (suspended.host_epoch, suspended.address) == (None, None)  # bound to no host
    assert suspended.state_reason is None
    assert await repo.get_microvm("mvm-e") == ended
    assert await repo.get_microvm("mvm-b") == elsewhere


async def test_a_host_that_comes_back_after_being_lost_can_change_nothing(
    repo: SqlRepository, place_vm: Any
) -> None:
    await register(repo, "h1")
    await expire(repo, "h1")
    assert len(await repo.mark_lost_expired()) == 1
    # A row that still names the lost host and its epoch (e.g. written in a race).
    stale = await place_vm("mvm-1", "h1", 1)

    assert await repo.heartbeat("h1", 1, 60.0, 0) is None
    assert await repo.host_vm_exited("h1", 1, "mvm-1", "qemu died") is False
    fenced = await repo.transition("mvm-1", expect=["RUNNING"], values={"state": "SUSPENDING"},
                                   fence=HostFence("h1", 1))  # fmt: skip
    assert fenced.status == "fenced"
    assert await repo.get_microvm("mvm-1") == stale
    lost = await repo.drain("h1")  # a drain leaves a lost host lost
    assert lost is not None
    assert lost.state == "LOST"

    back = await register(repo, "h1")
    assert (back.state, back.epoch) == ("ACTIVE", 2)
    assert await repo.heartbeat("h1", 2, 60.0, 0) is not None
    # The new epoch does not reach VMs placed under the old one.
    assert await repo.host_vm_exited("h1", 2, "mvm-1", "qemu died") is False
    assert await repo.get_microvm("mvm-1") == stale


async def test_a_host_reports_a_dead_vmm_only_for_its_own_vms_of_its_epoch(
    repo: SqlRepository, place_vm: Any
) -> None:
    for host_id in ("h1", "h1", "h2", "h2"):
        await register(repo, host_id)  # both at epoch 2
    mine = await place_vm("mvm-1", "h1", 2)
    older = await place_vm("mvm-2", "h1", 1)
    theirs = await place_vm("mvm-3", "h2", 2)
    suspended = await place_vm("mvm-4", "h1", 2, state="SUSPENDED")

    assert await repo.host_vm_exited("h1", 1, "mvm-2", "x") is False  # superseded epoch
    assert await repo.host_vm_exited("h1", 2, "mvm-3", "x") is False  # another host's VM
    assert await repo.host_vm_exited("h1", 2, "mvm-4", "x") is False  # not RUNNING
    assert await repo.host_vm_exited("h1", 2, "mvm-nope", "x") is False
    assert [await repo.get_microvm(v) for v in ("mvm-2", "mvm-3", "mvm-4")] == [
        older, theirs, suspended,
    ]  # fmt: skip

    assert await repo.host_vm_exited("h1", 2, "mvm-1", "QEMU exited with\tsignal 9") is True
    ended = await repo.get_microvm("mvm-1")
    assert ended is not None
    assert ended.state == "TERMINATED"
    assert ended.state_reason == "VmExited:QEMU_exited_with_signal_9"
    assert ended.terminated_at is not None
    assert (ended.address, ended.running_since) == (None, None)
    assert ended.host_epoch == mine.host_epoch
    assert await repo.host_vm_exited("h1", 2, "mvm-1", "again") is False


@pytest.mark.parametrize("with_capacity", [False, True])
@pytest.mark.parametrize("fence_epoch", [1, 2])
async def test_a_fenced_transition_applies_only_for_the_current_epoch(
    repo: SqlRepository, place_vm: Any, fence_epoch: int, with_capacity: bool
) -> None:
    await register(repo, "h1")
    await register(repo, "h1")  # epoch 2
    await place_vm("mvm-1", "h1", 2)
    fence = HostFence("h1", fence_epoch)
    capacity = AdmissionLimits(host_memory_budget_mib=8192, host_id="h1") if with_capacity else None
    result = await repo.transition("mvm-1", expect=["RUNNING"], values={"state": "SUSPENDING"},
                                   capacity=capacity, fence=fence)  # fmt: skip
    if fence_epoch == 1:
        assert result.status == "fenced"
        assert result.record is not None
        assert result.record.state == "RUNNING"
        # The fence is reported before the state: a fenced host must stop, whatever it wanted.
        other = await repo.transition("mvm-1", expect=["SUSPENDED"], values={"state": "PENDING"},
                                      capacity=capacity, fence=fence)  # fmt: skip
        assert other.status == "fenced"
        return
    assert result.status == "ok"
    again = await repo.transition("mvm-1", expect=["RUNNING"], values={"state": "SUSPENDED"},
                                  capacity=capacity, fence=fence)  # fmt: skip
    assert again.status == "conflict"  # the fence holds, the state does not

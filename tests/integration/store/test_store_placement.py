"""Placement on SQLite and PostgreSQL: the host chosen inside the transaction that admits a VM
(RunMicrovm) or resumes it, by capability, room (with overcommit), preference and best of K;
never a host that is not ACTIVE, whose lease ran out, or that is being declared lost."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from tests.integration.store.conftest import PlaceVm

from embervm.store import (
    AdmissionLimits,
    HostRecord,
    MicrovmRecord,
    Placement,
    RunnableVersion,
    SqlRepository,
)
from embervm.store.placement import choose_host
from embervm.store.schema import hosts, image_versions

ACCOUNT = "123456789012"
KVM = {"qemu": "8.2.2", "accelerator": "kvm", "cpu": "EPYC"}
TCG = {"qemu": "8.2.2", "accelerator": "tcg", "cpu": "EPYC"}


async def register(
    repo: SqlRepository, host_id: str, *, memory: int = 8192, caps: dict[str, str] = KVM,
    lease: float = 60.0,
) -> HostRecord:  # fmt: skip
    return await repo.register(host_id, f"{host_id}.fleet:8790", 100, memory, caps, lease)


async def add_version(repo: SqlRepository, memory_mib: int = 2048) -> RunnableVersion:
    now = datetime.now(UTC)
    async with repo.engine.begin() as conn:
        await conn.execute(image_versions.insert().values(
            account_id=ACCOUNT, image_name="web", number=1, state="SUCCESSFUL",
            status="ACTIVE", config={}, memory_mib=memory_mib, created_at=now, updated_at=now,
        ))  # fmt: skip
    return RunnableVersion(ACCOUNT, "web", 1)


def new_vm(microvm_id: str, memory_mib: int = 2048) -> MicrovmRecord:
    now = datetime.now(UTC)
    return MicrovmRecord(
        microvm_id=microvm_id, account_id=ACCOUNT, image_name="web",
        image_arn=f"arn:aws:lambda:us-east-1:{ACCOUNT}:microvm-image:web", image_version="1",
        state="PENDING", endpoint=f"{microvm_id}.microvm.localhost", memory_mib=memory_mib,
        vcpus=1, maximum_duration_seconds=28800, started_at=now, updated_at=now,
        expires_at=now + timedelta(hours=8), host_id="unplaced",
    )  # fmt: skip


async def admit(
    repo: SqlRepository, runnable: RunnableVersion, microvm_id: str, placement: Placement,
    memory_mib: int = 2048,
) -> MicrovmRecord | None:  # fmt: skip
    outcome = await repo.admit_microvm(
        new_vm(microvm_id, memory_mib),
        limits=AdmissionLimits(placement=placement),
        runnable=runnable,
        claim=None,
    )
    if outcome.status == "capacity":
        return None
    assert outcome.status == "created", outcome
    return await repo.get_microvm(microvm_id)


EVERY = Placement(choices=100)  # best of "all": the most room wins, deterministically


async def test_the_host_with_most_room_takes_the_vm_and_the_record_carries_its_epoch(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    runnable = await add_version(repo)
    await register(repo, "h1")
    await register(repo, "h2")
    await register(repo, "h2")  # epoch 2
    await place_vm("mvm-busy", "h1", 1, memory_mib=4096)
    vm = await admit(repo, runnable, "mvm-1", EVERY)
    assert vm is not None
    assert (vm.host_id, vm.host_epoch) == ("h2", 2)


async def test_capabilities_must_match_and_room_counts_memory_holding_vms_only(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    runnable = await add_version(repo)
    await register(repo, "kvm-host", memory=4096)
    await register(repo, "tcg-host", memory=65536, caps=TCG)
    await place_vm("mvm-a", "kvm-host", 1, memory_mib=1024, state="RUNNING")
    await place_vm("mvm-b", "kvm-host", 1, memory_mib=1024, state="SUSPENDED")  # on disk
    await place_vm("mvm-c", "kvm-host", 1, memory_mib=1024, state="TERMINATED")
    needs_kvm = Placement(required={"accelerator": "kvm", "qemu": "8.2.2"}, choices=100)
    vm = await admit(repo, runnable, "mvm-1", needs_kvm, memory_mib=3072)  # 1024 + 3072 = 4096
    assert vm is not None
    assert vm.host_id == "kvm-host"
    # Full now; the big TCG host does not qualify, so there is no room anywhere.
    assert await admit(repo, runnable, "mvm-2", needs_kvm, memory_mib=512) is None
    assert await repo.get_microvm("mvm-2") is None  # nothing written for a refusal


async def test_overcommit_stretches_a_hosts_room(repo: SqlRepository) -> None:
    runnable = await add_version(repo)
    await register(repo, "h1", memory=4096)
    placed = [await admit(repo, runnable, f"mvm-{i}", Placement(overcommit=2.0)) for i in range(5)]
    assert [vm is not None for vm in placed] == [True, True, True, True, False]  # 8192 MiB


async def test_a_preferred_host_goes_first_and_a_resume_prefers_the_vms_last_host(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    runnable = await add_version(repo)
    for name in ("h1", "h2", "h3"):
        await register(repo, name)
    await place_vm("mvm-load", "h3", 1, memory_mib=4096)
    vm = await admit(repo, runnable, "mvm-1", Placement(prefer=("h3", "h1"), choices=100))
    assert vm is not None
    assert vm.host_id == "h3"  # preferred, though it has the least room

    suspended = await place_vm("mvm-s", "h2", None, state="SUSPENDED", memory_mib=1024)
    result = await repo.transition(
        suspended.microvm_id,
        expect=("SUSPENDED",),
        values={"state": "PENDING"},
        capacity=AdmissionLimits(placement=EVERY),
    )
    assert result.status == "ok"
    assert result.record is not None
    assert (result.record.state, result.record.host_id, result.record.host_epoch) == (
        "PENDING",
        "h2",
        1,
    )


async def test_a_resume_moves_to_another_host_when_the_last_one_is_gone(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    await register(repo, "h1")
    await register(repo, "h2")
    assert await repo.drain("h1") is not None
    await place_vm("mvm-s", "h1", None, state="SUSPENDED")
    result = await repo.transition(
        "mvm-s",
        expect=("SUSPENDED",),
        values={"state": "PENDING"},
        capacity=AdmissionLimits(placement=EVERY),
    )
    assert result.record is not None
    assert (result.status, result.record.host_id) == ("ok", "h2")
    await place_vm("mvm-t", "h1", None, state="SUSPENDED", memory_mib=8192)
    full = await repo.transition(
        "mvm-t",
        expect=("SUSPENDED",),
        values={"state": "PENDING"},
        capacity=AdmissionLimits(placement=EVERY),
    )
    assert full.status == "capacity"  # h2 has 6 GiB left; h1 drains
    still = await repo.get_microvm("mvm-t")
    assert still is not None
    assert (still.state, still.host_id) == ("SUSPENDED", "h1")


@pytest.mark.parametrize("why", ["draining", "lost", "lease_ran_out"])
async def test_no_vm_goes_to_a_host_that_is_not_active_and_leased(
    repo: SqlRepository, why: str
) -> None:
    runnable = await add_version(repo)
    await register(repo, "h1", lease=0.5 if why == "lease_ran_out" else 60.0)
    if why == "draining":
        await repo.drain("h1")
    elif why == "lost":
        async with repo.engine.begin() as conn:
            await conn.execute(hosts.update().values(state="LOST"))
    else:
        await asyncio.sleep(0.8)
    assert await admit(repo, runnable, "mvm-1", EVERY) is None


async def test_best_of_k_draws_k_candidates_and_takes_the_roomiest_of_them(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    for index, name in enumerate(("h1", "h2", "h3", "h4")):
        await register(repo, name)
        if index:
            await place_vm(f"mvm-{name}", name, 1, memory_mib=1024 * index)
    seen: set[str] = set()
    async with repo.engine.connect() as conn:
        for seed in range(40):
            choice = await choose_host(
                conn,
                memory_mib=1024,
                placement=Placement(choices=1),
                exclude_vm="mvm-new",
                rng=random.Random(seed),
            )
            assert choice is not None
            seen.add(choice.host_id)
        best_of_all = await choose_host(
            conn, memory_mib=1024, placement=Placement(choices=4), exclude_vm="mvm-new"
        )
    assert seen == {"h1", "h2", "h3", "h4"}  # K=1: any of them
    assert best_of_all is not None
    assert (best_of_all.host_id, best_of_all.free_mib) == ("h1", 8192)


async def test_placement_waits_for_a_reaper_and_never_lands_on_the_host_it_marks(
    database_url: str, repo: SqlRepository
) -> None:
    if repo.engine.dialect.name != "postgresql":
        pytest.skip("row locks: PostgreSQL only (SQLite serializes writers)")
    runnable = await add_version(repo)
    await register(repo, "h1")
    await register(repo, "h2", memory=4096)
    # A reaper holds h1's row (as mark_lost_expired does) and marks it LOST; the admission
    # that chose h1 meanwhile must not commit a VM onto it.
    async with repo.engine.connect() as reaper, reaper.begin():
        await reaper.execute(
            sa.select(hosts.c.host_id).where(hosts.c.host_id == "h1").with_for_update()
        )
        admitting = asyncio.create_task(admit(repo, runnable, "mvm-1", EVERY))
        await asyncio.sleep(0.5)
        assert not admitting.done()  # waiting on the row lock
        await reaper.execute(hosts.update().where(hosts.c.host_id == "h1").values(state="LOST"))
    vm = await admitting
    assert vm is not None
    assert vm.host_id == "h2"

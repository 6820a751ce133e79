"""``rebind`` on SQLite and PostgreSQL: after a host registers again, the live VMs it holds
(and PENDING ones, whose task starts afresh) move to its new epoch; the rest are TERMINATED
with the lost-host reason; a host superseded meanwhile changes nothing."""

from __future__ import annotations

from tests.integration.store.conftest import PlaceVm

from embervm.store import HostRecord, SqlRepository
from embervm.store.hosts import lost_reason


async def register(repo: SqlRepository, host_id: str = "h1") -> HostRecord:
    return await repo.register(host_id, f"{host_id}.fleet:8790", 100, 8192, {}, 60.0)


async def test_held_vms_follow_the_new_epoch_and_the_others_end(
    repo: SqlRepository, place_vm: PlaceVm
) -> None:
    await register(repo)
    await register(repo, "h2")
    await place_vm("mvm-held", "h1", 1)
    await place_vm("mvm-gone", "h1", 1)
    await place_vm("mvm-pending", "h1", 1, state="PENDING")
    await place_vm("mvm-suspended", "h1", 1, state="SUSPENDED")
    await place_vm("mvm-elsewhere", "h2", 1)
    again = await register(repo)
    assert again.epoch == 2
    outcome = await repo.rebind("h1", 2, ["mvm-held"])
    assert outcome == (["mvm-held", "mvm-pending"], ["mvm-gone"])
    held = await repo.get_microvm("mvm-held")
    gone = await repo.get_microvm("mvm-gone")
    suspended = await repo.get_microvm("mvm-suspended")
    elsewhere = await repo.get_microvm("mvm-elsewhere")
    assert held is not None
    assert gone is not None
    assert suspended is not None
    assert elsewhere is not None
    assert (held.state, held.host_epoch) == ("RUNNING", 2)
    assert (gone.state, gone.state_reason, gone.host_epoch) == (
        "TERMINATED",
        lost_reason("h1"),
        None,
    )
    assert (suspended.state, suspended.host_epoch) == ("SUSPENDED", 1)  # not live: untouched
    assert (elsewhere.state, elsewhere.host_epoch) == ("RUNNING", 1)
    assert await repo.rebind("h1", 2, ["mvm-held"]) == ([], [])  # nothing left to do


async def test_a_superseded_host_cannot_rebind(repo: SqlRepository, place_vm: PlaceVm) -> None:
    await register(repo)
    await place_vm("mvm-1", "h1", 1)
    await register(repo)
    await register(repo)  # epoch 3: the epoch-2 process is stale
    assert await repo.rebind("h1", 2, []) is None
    vm = await repo.get_microvm("mvm-1")
    assert vm is not None
    assert (vm.state, vm.host_epoch) == ("RUNNING", 1)

"""Block allocation: unique, lowest-free, persistent, safe under concurrency."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embervm.errors import NetworkSetupError
from embervm.network._addressing import Pool
from embervm.network._allocations import AllocationStore

OpenStore = Callable[..., AllocationStore]


@pytest.fixture
def store() -> Iterator[OpenStore]:
    """Opens stores and closes them (each holds its state dir's lock file open)."""
    opened: list[AllocationStore] = []

    def open_store(path: Path, cidr: str = "10.213.0.0/24") -> AllocationStore:
        s = AllocationStore(path, Pool(cidr))
        opened.append(s)
        s.open()
        return s

    yield open_store
    for s in opened:
        s.close()


async def test_allocations_are_lowest_free_and_reused_per_vm(
    tmp_path: Path, store: OpenStore
) -> None:
    s = store(tmp_path)
    a = await s.allocate("a", egress=False)
    b = await s.allocate("b", egress=True)
    assert (a.block, b.block) == (1, 2)
    assert (await s.allocate("a", egress=True)).block == 1
    await s.release("a")
    assert (await s.allocate("c", egress=False)).block == 1


async def test_allocations_survive_a_restart(tmp_path: Path, store: OpenStore) -> None:
    s = store(tmp_path)
    await s.allocate("a", egress=True)
    await s.allocate("b", egress=False)
    await s.release("a")
    s.close()

    again = store(tmp_path)
    assert [(x.vm_id, x.block, x.egress) for x in again.all()] == [("b", 2, False)]
    assert (await again.allocate("c", egress=False)).block == 1


async def test_concurrent_allocations_never_collide(tmp_path: Path, store: OpenStore) -> None:
    s = store(tmp_path, "10.213.0.0/22")
    allocs = await asyncio.gather(*(s.allocate(f"vm-{i}", egress=False) for i in range(100)))
    assert len({a.block for a in allocs}) == 100
    assert len(list((tmp_path / "vms").glob("*.json"))) == 100


async def test_exhausted_pool_is_an_error(tmp_path: Path, store: OpenStore) -> None:
    s = store(tmp_path, "10.213.0.0/29")  # one block besides the resolver's
    await s.allocate("a", egress=False)
    with pytest.raises(NetworkSetupError, match="exhausted"):
        await s.allocate("b", egress=False)


async def test_a_second_store_on_the_same_dir_is_refused(tmp_path: Path, store: OpenStore) -> None:
    store(tmp_path)
    with pytest.raises(NetworkSetupError, match="in use"):
        store(tmp_path)


async def test_files_are_complete_json_without_temporaries(
    tmp_path: Path, store: OpenStore
) -> None:
    s = store(tmp_path)
    alloc = await s.allocate("vm-x", egress=True)
    files = list((tmp_path / "vms").iterdir())
    assert [f.name for f in files] == [f"{alloc.short}.json"]
    data = json.loads(files[0].read_text())
    assert data == {
        "version": 1,
        "pool": "10.213.0.0/24",
        "vm_id": "vm-x",
        "short": alloc.short,
        "block": 1,
        "egress": True,
    }


async def test_release_is_idempotent(tmp_path: Path, store: OpenStore) -> None:
    s = store(tmp_path)
    await s.release("never")
    await s.allocate("a", egress=False)
    await s.release("a")
    await s.release("a")
    assert s.all() == []


async def test_corrupt_allocation_file_is_reported(tmp_path: Path, store: OpenStore) -> None:
    (tmp_path / "vms").mkdir()
    (tmp_path / "vms" / "0123456789.json").write_text("{")
    with pytest.raises(NetworkSetupError, match="unreadable"):
        store(tmp_path)


async def test_changing_the_pool_under_live_allocations_is_refused(
    tmp_path: Path, store: OpenStore
) -> None:
    s = store(tmp_path)
    await s.allocate("a", egress=False)
    s.close()
    with pytest.raises(NetworkSetupError, match="pool"):
        store(tmp_path, "10.99.0.0/24")

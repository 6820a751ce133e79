"""``HostMembership``: register, heartbeat, and stop the VMs when the fleet gave the host up —
told so by a heartbeat, or guessed from a whole lease without one (self-fencing) — then
register again once the store answers. A fake registry and a fake monotonic clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from embervm.host.membership import HostMembership
from embervm.store import HostFence, HostRecord

T0 = datetime(2026, 12, 8, tzinfo=UTC)


@dataclass
class FakeRegistry:
    epoch: int = 0
    down: bool = False  # the store does not answer
    lost: bool = False  # the fleet declared the host lost
    beats: list[tuple[int, int]] = field(default_factory=list)
    slow: Callable[[], None] = lambda: None  # what a slow answer does to the host's clock

    def _row(self) -> HostRecord:
        return HostRecord(
            host_id="h1", epoch=self.epoch, state="ACTIVE", address="10.0.0.5:8790", pid=7,
            memory_total_mib=8192, memory_reserved_mib=0, capabilities={}, registered_at=T0,
            heartbeat_at=T0, lease_expires_at=T0,
        )  # fmt: skip

    async def register(
        self, host_id: str, address: str, pid: int, memory_total_mib: int,
        capabilities: Mapping[str, Any], lease_seconds: float,
    ) -> HostRecord:  # fmt: skip
        if self.down:
            raise OSError("connection refused")
        self.epoch += 1
        self.lost = False
        return self._row()

    async def heartbeat(
        self, host_id: str, epoch: int, lease_seconds: float, memory_reserved_mib: int
    ) -> HostRecord | None:
        if self.down:
            raise OSError("connection refused")
        self.slow()
        self.beats.append((epoch, memory_reserved_mib))
        if self.lost or epoch != self.epoch:
            return None
        return replace(self._row(), memory_reserved_mib=memory_reserved_mib)


@dataclass
class Rig:
    registry: FakeRegistry
    membership: HostMembership
    clock: list[float]
    events: list[str]


@pytest.fixture
def rig() -> Rig:
    registry = FakeRegistry()
    clock = [100.0]
    events: list[str] = []

    async def on_lost() -> None:
        events.append("stopped every VM")

    async def on_registered(fence: HostFence) -> None:
        events.append(f"registered {fence.host_id}@{fence.epoch}")

    membership = HostMembership(
        registry,  # type: ignore[arg-type]
        host_id="h1",
        address="10.0.0.5:8790",
        memory_total_mib=8192,
        capabilities={"accelerator": "tcg"},
        reserved_mib=lambda: 2048,
        on_lost=on_lost,
        on_registered=on_registered,
        lease_seconds=9.0,
        monotonic=lambda: clock[0],
    )
    return Rig(registry, membership, clock, events)


async def test_heartbeats_carry_the_epoch_and_the_reserved_memory(rig: Rig) -> None:
    await rig.membership.register()
    assert rig.membership.fence == HostFence("h1", 1)
    assert rig.membership.interval == 3.0
    await rig.membership.beat()
    assert rig.registry.beats == [(1, 2048)]
    assert rig.events == ["registered h1@1"]


async def test_a_host_declared_lost_stops_its_vms_and_comes_back_with_a_new_epoch(
    rig: Rig,
) -> None:
    await rig.membership.register()
    rig.registry.lost = True
    await rig.membership.beat()
    assert rig.events == ["registered h1@1", "stopped every VM"]
    with pytest.raises(RuntimeError):
        rig.membership.fence  # noqa: B018 - nothing may be written meanwhile
    await rig.membership.beat()
    assert rig.membership.fence == HostFence("h1", 2)
    assert rig.events[-1] == "registered h1@2"


async def test_a_whole_lease_without_the_store_stops_the_vms_before_the_fleet_does(
    rig: Rig,
) -> None:
    await rig.membership.register()  # valid until 100 + 9 by the host's own clock
    rig.registry.down = True
    rig.clock[0] = 108.9
    await rig.membership.beat()
    assert rig.events == ["registered h1@1"]  # still within the lease: keep serving
    rig.clock[0] = 109.0
    await rig.membership.beat()
    assert rig.events == ["registered h1@1", "stopped every VM"]
    rig.clock[0] = 130.0
    await rig.membership.beat()  # still down: nothing more to stop, no crash
    assert rig.events == ["registered h1@1", "stopped every VM"]
    rig.registry.down = False
    await rig.membership.beat()
    assert rig.events[-1] == "registered h1@2"


async def test_the_lease_counts_from_when_the_last_good_heartbeat_was_sent(rig: Rig) -> None:
    await rig.membership.register()
    rig.clock[0] = 105.0
    rig.registry.slow = lambda: rig.clock.__setitem__(0, rig.clock[0] + 2.0)
    await rig.membership.beat()  # sent at 105, answered at 107: valid until 114, not 116
    rig.registry.down = True
    rig.clock[0] = 113.5
    await rig.membership.beat()
    assert "stopped every VM" not in rig.events
    rig.clock[0] = 114.0
    await rig.membership.beat()
    assert rig.events[-1] == "stopped every VM"

"""``HostMembership``: a fleet host's row in the store, kept alive (docs/FLEET.md).

The host registers (a new epoch: every write it makes from then on is fenced by it; then
``on_registered`` moves the VMs it holds to that epoch, ``HostRegistry.rebind``) and
heartbeats every third of its lease. Two things end a membership:

- a heartbeat answers None: the host was declared LOST (its lease ran out on the database's
  clock) or registered again elsewhere with the same id. Its VMs are TERMINATED or unbound in
  the store already; it stops every VM it still runs (``on_lost``) and registers anew;
- no heartbeat has succeeded for a whole lease, by this host's own monotonic clock, counted
  from the moment the last successful one was *sent* (so it ends no later than the database's
  lease): the host may be partitioned from PostgreSQL and is about to be declared lost. It
  stops its VMs first (self-fencing: a VM never serves on a host the fleet has given up on) and
  registers anew once the database answers again.

Database errors in between are logged once per outage and retried; nothing else stops the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from embervm.store import HostFence, HostRecord, HostRegistry

log = logging.getLogger("embervm.host.membership")

DEFAULT_LEASE_SECONDS = 10.0


class HostMembership:
    def __init__(
        self,
        registry: HostRegistry,
        *,
        host_id: str,
        address: str,
        memory_total_mib: int,
        capabilities: Mapping[str, Any],
        reserved_mib: Callable[[], int],
        on_lost: Callable[[], Awaitable[None]],
        on_registered: Callable[[HostFence], Awaitable[None]],
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        pid: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.host_id = host_id
        self.address = address
        self.memory_total_mib = memory_total_mib
        self.capabilities = dict(capabilities)
        self.reserved_mib = reserved_mib
        self.on_lost = on_lost
        self.on_registered = on_registered
        self.lease_seconds = lease_seconds
        self.pid = pid
        self._monotonic = monotonic
        self.record: HostRecord | None = None
        self._valid_until = 0.0  # monotonic: the lease as this host must assume it
        self._failing = False

    @property
    def fence(self) -> HostFence:
        if self.record is None:
            raise RuntimeError("the host has not registered")
        return HostFence(self.host_id, self.record.epoch)

    @property
    def interval(self) -> float:
        return self.lease_seconds / 3

    async def register(self) -> HostRecord:
        sent = self._monotonic()
        record = await self.registry.register(
            self.host_id,
            self.address,
            self.pid,
            self.memory_total_mib,
            self.capabilities,
            self.lease_seconds,
        )
        self.record = record
        self._valid_until = sent + self.lease_seconds
        await self.on_registered(HostFence(self.host_id, record.epoch))
        log.info("host %s registered at epoch %d", self.host_id, record.epoch)
        return record

    async def beat(self) -> None:
        """One heartbeat (or re-registration after a lost membership); never raises for a
        database that does not answer."""
        try:
            if self.record is None:
                await self.register()
                self._recovered()
                return
            sent = self._monotonic()
            renewed = await self.registry.heartbeat(
                self.host_id, self.record.epoch, self.lease_seconds, self.reserved_mib()
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failing:
                log.warning("host %s cannot reach the store: %s", self.host_id, exc)
                self._failing = True
            if self.record is not None and self._monotonic() >= self._valid_until:
                await self._lose("no heartbeat for a whole lease")
            return
        self._recovered()
        if renewed is None:
            await self._lose("the fleet declared it lost")
            return
        self.record = renewed
        self._valid_until = sent + self.lease_seconds

    def _recovered(self) -> None:
        if self._failing:
            log.warning("host %s reaches the store again", self.host_id)
            self._failing = False

    async def _lose(self, why: str) -> None:
        epoch = self.record.epoch if self.record is not None else 0
        log.warning("host %s lost its membership (epoch %d): %s", self.host_id, epoch, why)
        self.record = None
        await self.on_lost()

    async def keep_beating(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

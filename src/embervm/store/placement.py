"""Placement: which host of a fleet takes a VM, decided inside the write transaction that
admits it (RunMicrovm) or resumes it (SUSPENDED → PENDING), so the reservation and the record
are one commit (docs/FLEET.md).

A host qualifies when it is ACTIVE, its lease has not run out (the database's clock), it has
every capability the snapshot needs (``Placement.required``: the QEMU version, the accelerator
and the CPU model a restore must match), and its room holds the VM: ``memory_total_mib *
overcommit`` minus the memory of the VMs placed on it that hold RAM (PENDING, RUNNING,
SUSPENDING, TERMINATING). Among those, a preferred host (the VM's last host, hosts that cache
the image) is taken first, in the order given; otherwise the one with the most room among
``choices`` drawn at random (best of K: near the best spread without every admission piling
onto the same emptiest host).

The chosen host's row is then read ``FOR SHARE`` (PostgreSQL): a reaper marking it LOST
(``sql_hosts``, ``FOR UPDATE``) waits for this commit, and then terminates the VM with the
host's others — a VM is never placed on a host already declared lost. If the host changed
between the two reads, the next candidate is tried. Admissions are serialized by the admission
lock already, so two cannot fill the same room twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.store.records import MEMORY_HOLDING_STATES, Placement
from embervm.store.schema import hosts, microvms
from embervm.store.sql_hosts import db_now


@dataclass(frozen=True)
class HostChoice:
    host_id: str
    epoch: int
    free_mib: int  # room left before this VM


async def choose_host(
    conn: AsyncConnection,
    *,
    memory_mib: int,
    placement: Placement,
    exclude_vm: str,
    rng: random.Random | None = None,
) -> HostChoice | None:
    """The host that takes a VM of ``memory_mib``, its row locked; None: no host has room."""
    dialect = conn.dialect.name
    candidates = await _fitting(conn, dialect, memory_mib, placement, exclude_vm)
    while candidates:
        choice = _pick(candidates, placement, rng or _RNG)
        if await _lock(conn, dialect, choice):
            return choice
        candidates = [c for c in candidates if c.host_id != choice.host_id]
    return None


_RNG = random.Random()  # noqa: S311 - spreading load, not a secret


async def _fitting(
    conn: AsyncConnection,
    dialect: str,
    memory_mib: int,
    placement: Placement,
    exclude_vm: str,
) -> list[HostChoice]:
    h, m = hosts.c, microvms.c
    held = (
        sa.select(sa.func.coalesce(sa.func.sum(m.memory_mib), 0))
        .where(
            m.host_id == h.host_id,
            m.state.in_(MEMORY_HOLDING_STATES),
            m.microvm_id != exclude_vm,
        )
        .scalar_subquery()
    )
    rows = await conn.execute(
        sa.select(h.host_id, h.epoch, h.memory_total_mib, h.capabilities, held.label("held"))
        .where(h.state == "ACTIVE", h.lease_expires_at > db_now(dialect))
        .order_by(h.host_id)
    )
    fitting = []
    for row in rows:
        capabilities = row.capabilities or {}
        if any(capabilities.get(key) != value for key, value in placement.required.items()):
            continue
        free = int(row.memory_total_mib * placement.overcommit) - int(row.held)
        if free >= memory_mib:
            fitting.append(HostChoice(row.host_id, row.epoch, free))
    return fitting


def _pick(candidates: list[HostChoice], placement: Placement, rng: random.Random) -> HostChoice:
    by_id = {c.host_id: c for c in candidates}
    for host_id in placement.prefer:
        if host_id in by_id:
            return by_id[host_id]
    drawn = rng.sample(candidates, min(max(placement.choices, 1), len(candidates)))
    return max(drawn, key=lambda c: (c.free_mib, c.host_id))


async def _lock(conn: AsyncConnection, dialect: str, choice: HostChoice) -> bool:
    """Read the chosen row again, ``FOR SHARE`` on PostgreSQL: still ACTIVE at that epoch."""
    h = hosts.c
    query = sa.select(h.host_id).where(
        h.host_id == choice.host_id,
        h.epoch == choice.epoch,
        h.state == "ACTIVE",
        h.lease_expires_at > db_now(dialect),
    )
    if dialect == "postgresql":
        query = query.with_for_update(read=True)
    return (await conn.execute(query)).first() is not None

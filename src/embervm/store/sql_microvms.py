"""The MicroVM rows of ``SqlRepository``: admission, reads, compare-and-set transitions, usage.

Admission reads what it needs in one statement (``admission_query``) under the admission lock;
state changes are conditional UPDATEs (``WHERE state IN (...)``), so two racing transitions
cannot both win. A fleet host's transition also carries its ``HostFence`` (``sql_hosts``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.contracts import MicrovmState
from embervm.store.admission_query import read_admission, refusal
from embervm.store.placement import choose_host
from embervm.store.records import (
    MEMORY_HOLDING_STATES,
    AdmissionLimits,
    HostFence,
    IdempotencyClaim,
    InsertOutcome,
    MicrovmRecord,
    UsageRecord,
)
from embervm.store.repository import Page, RunnableVersion, Transition
from embervm.store.schema import microvms, usage
from embervm.store.sql_hosts import fenced, vm_fence
from embervm.store.sql_transactions import SqlTransactions, no_seq


class SqlMicrovms(SqlTransactions):
    async def admit_microvm(
        self,
        vm: MicrovmRecord,
        *,
        limits: AdmissionLimits,
        runnable: RunnableVersion,
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        async with self._write(images_unchanged=True) as conn:
            await self._lock_admission(conn)
            snapshot = await read_admission(conn, vm, limits=limits, runnable=runnable, claim=claim)
            refused = refusal(snapshot, vm, limits=limits, runnable=runnable, claim=claim)
            if refused is not None:
                return refused
            if limits.placement is not None:
                host = await choose_host(
                    conn,
                    memory_mib=vm.memory_mib,
                    placement=limits.placement,
                    exclude_vm=vm.microvm_id,
                )
                if host is None:
                    return InsertOutcome("capacity")
                vm = replace(vm, host_id=host.host_id, host_epoch=host.epoch)
            await conn.execute(microvms.insert().values(**no_seq(vm)))
            await conn.execute(
                usage.insert().values(
                    microvm_id=vm.microvm_id,
                    vcpu_seconds=0.0,
                    gib_seconds=0.0,
                    snapshot_bytes_written=0,
                    snapshot_bytes_read=0,
                )
            )
            await self._insert_claim(conn, claim, vm.started_at)
            return InsertOutcome("created", vm.microvm_id)

    async def _host_memory(self, conn: AsyncConnection, host_id: str, *, exclude: str) -> int:
        m = microvms.c
        held = await conn.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(m.memory_mib), 0)).where(
                m.host_id == host_id,
                m.state.in_(MEMORY_HOLDING_STATES),
                m.microvm_id != exclude,
            )
        )
        return int(held or 0)

    async def _vm_row(self, conn: AsyncConnection, microvm_id: str) -> MicrovmRecord | None:
        row = (
            await conn.execute(sa.select(microvms).where(microvms.c.microvm_id == microvm_id))
        ).first()
        return MicrovmRecord(**row._mapping) if row is not None else None

    async def get_microvm(self, microvm_id: str) -> MicrovmRecord | None:
        async with self._read() as conn:
            return await self._vm_row(conn, microvm_id)

    async def list_microvms(
        self,
        account_id: str,
        page: Page,
        *,
        image_name: str | None = None,
        image_version: str | None = None,
    ) -> list[MicrovmRecord]:
        m = microvms.c
        query = sa.select(microvms).where(m.account_id == account_id)
        if image_name is not None:
            query = query.where(m.image_name == image_name)
        if image_version is not None:
            query = query.where(m.image_version == image_version)
        if page.after is not None:
            query = query.where(m.seq > page.after)
        query = query.order_by(m.seq).limit(page.limit)
        async with self._read() as conn:
            return [MicrovmRecord(**r._mapping) for r in await conn.execute(query)]

    async def microvms_in_states(
        self, states: Collection[MicrovmState], *, host_id: str | None = None
    ) -> list[MicrovmRecord]:
        m = microvms.c
        query = sa.select(microvms).where(m.state.in_(list(states))).order_by(m.seq)
        if host_id is not None:
            query = query.where(m.host_id == host_id)
        async with self._read() as conn:
            return [MicrovmRecord(**r._mapping) for r in await conn.execute(query)]

    async def transition(
        self,
        microvm_id: str,
        *,
        expect: Collection[str],
        values: Mapping[str, Any],
        capacity: AdmissionLimits | None = None,
        fence: HostFence | None = None,
    ) -> Transition:
        guard = vm_fence(fence) if fence is not None else ()
        async with self._write(images_unchanged=True) as conn:
            if capacity is not None:
                await self._lock_admission(conn)
                current = await self._vm_row(conn, microvm_id)
                if current is None:
                    return Transition("missing")
                if fence is not None and not await self._fence_holds(conn, fence, current):
                    return Transition("fenced", current)
                if current.state not in expect:
                    return Transition("conflict", current)
                budget = capacity.host_memory_budget_mib
                if budget is not None:
                    held = await self._host_memory(conn, capacity.host_id, exclude=microvm_id)
                    if held + current.memory_mib > budget:
                        return Transition("capacity", current)
                if capacity.placement is not None:
                    host = await choose_host(
                        conn,
                        memory_mib=current.memory_mib,
                        placement=capacity.placement.preferring(current.host_id),
                        exclude_vm=microvm_id,
                    )
                    if host is None:
                        return Transition("capacity", current)
                    values = {**values, "host_id": host.host_id, "host_epoch": host.epoch}
            m = microvms.c
            row = (
                await conn.execute(
                    microvms.update()
                    .where(m.microvm_id == microvm_id, m.state.in_(list(expect)), *guard)
                    .values(**values)
                    .returning(*microvms.c)
                )
            ).first()
            if row is not None:
                return Transition("ok", MicrovmRecord(**row._mapping))
            found = await self._vm_row(conn, microvm_id)
            if found is None:
                return Transition("missing")
            if fence is not None and not await self._fence_holds(conn, fence, found):
                return Transition("fenced", found)
            return Transition("conflict", found)

    @staticmethod
    async def _fence_holds(conn: AsyncConnection, fence: HostFence, vm: MicrovmRecord) -> bool:
        if vm.host_id != fence.host_id or vm.host_epoch != fence.epoch:
            return False
        return bool(await conn.scalar(sa.select(fenced(fence.host_id, fence.epoch))))

    async def update_microvm(self, microvm_id: str, values: Mapping[str, Any]) -> None:
        async with self._write(images_unchanged=True) as conn:
            await conn.execute(
                microvms.update().where(microvms.c.microvm_id == microvm_id).values(**values)
            )

    async def add_usage(
        self,
        microvm_id: str,
        *,
        vcpu_seconds: float = 0.0,
        gib_seconds: float = 0.0,
        snapshot_bytes_written: int = 0,
        snapshot_bytes_read: int = 0,
    ) -> None:
        u = usage.c
        async with self._write(images_unchanged=True) as conn:
            await conn.execute(
                usage.update()
                .where(u.microvm_id == microvm_id)
                .values(
                    vcpu_seconds=u.vcpu_seconds + vcpu_seconds,
                    gib_seconds=u.gib_seconds + gib_seconds,
                    snapshot_bytes_written=u.snapshot_bytes_written + snapshot_bytes_written,
                    snapshot_bytes_read=u.snapshot_bytes_read + snapshot_bytes_read,
                )
            )

    async def get_usage(self, microvm_id: str) -> UsageRecord:
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(usage).where(usage.c.microvm_id == microvm_id))
            ).first()
        return UsageRecord(**row._mapping) if row is not None else UsageRecord(microvm_id)

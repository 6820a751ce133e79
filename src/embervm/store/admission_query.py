"""What RunMicrovm's admission reads, in one statement.

Admission needs the idempotency claim, the version's state, the account's active VMs and
memory and the host's held memory. Read one by one that is five round trips to the database
(on SQLite each one a hop to aiosqlite's thread); here they are scalar subqueries of a single
SELECT, read inside the admission's write transaction, so they see one consistent state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.store.records import (
    ACTIVE_MICROVM_STATES,
    MEMORY_HOLDING_STATES,
    AdmissionLimits,
    IdempotencyClaim,
    InsertOutcome,
    MicrovmRecord,
)
from embervm.store.repository import RunnableVersion
from embervm.store.schema import idempotency, image_versions, microvms


@dataclass(frozen=True)
class AdmissionSnapshot:
    claim_hash: str | None  # request hash of a claim with the same token, None if unclaimed
    claim_resource: str | None
    version_state: str | None  # None: the version does not exist
    version_status: str | None
    account_vms: int  # non-terminated VMs of the account
    account_memory_mib: int
    host_memory_mib: int  # memory held on the host by other VMs


def _scalar(query: sa.Select[Any], name: str) -> sa.Label[Any]:
    return query.scalar_subquery().label(name)


async def read_admission(
    conn: AsyncConnection,
    vm: MicrovmRecord,
    *,
    limits: AdmissionLimits,
    runnable: RunnableVersion,
    claim: IdempotencyClaim | None,
) -> AdmissionSnapshot:
    i, v, m = idempotency.c, image_versions.c, microvms.c
    columns: list[sa.Label[Any]] = []
    if claim is not None:
        same_token = (
            i.account_id == claim.account_id,
            i.scope == claim.scope,
            i.client_token == claim.client_token,
        )
        columns += [
            _scalar(sa.select(i.request_hash).where(*same_token), "claim_hash"),
            _scalar(sa.select(i.resource_id).where(*same_token), "claim_resource"),
        ]
    version = (
        v.account_id == runnable.account_id,
        v.image_name == runnable.image_name,
        v.number == runnable.number,
    )
    columns += [
        _scalar(sa.select(v.state).where(*version), "version_state"),
        _scalar(sa.select(v.status).where(*version), "version_status"),
    ]
    active = (m.account_id == vm.account_id, m.state.in_(ACTIVE_MICROVM_STATES))
    if limits.max_microvms is not None or limits.max_total_memory_mib is not None:
        columns += [
            _scalar(sa.select(sa.func.count()).select_from(microvms).where(*active), "account_vms"),
            _scalar(
                sa.select(sa.func.coalesce(sa.func.sum(m.memory_mib), 0)).where(*active),
                "account_memory_mib",
            ),
        ]
    if limits.host_memory_budget_mib is not None:
        held = (
            m.host_id == limits.host_id,
            m.state.in_(MEMORY_HOLDING_STATES),
            m.microvm_id != vm.microvm_id,
        )
        columns.append(
            _scalar(
                sa.select(sa.func.coalesce(sa.func.sum(m.memory_mib), 0)).where(*held),
                "host_memory_mib",
            )
        )
    row = (await conn.execute(sa.select(*columns))).one()._mapping
    return AdmissionSnapshot(
        claim_hash=row.get("claim_hash"),
        claim_resource=row.get("claim_resource"),
        version_state=row["version_state"],
        version_status=row["version_status"],
        account_vms=int(row.get("account_vms") or 0),
        account_memory_mib=int(row.get("account_memory_mib") or 0),
        host_memory_mib=int(row.get("host_memory_mib") or 0),
    )


def refusal(
    snapshot: AdmissionSnapshot,
    vm: MicrovmRecord,
    *,
    limits: AdmissionLimits,
    runnable: RunnableVersion,
    claim: IdempotencyClaim | None,
) -> InsertOutcome | None:
    """Why the snapshot refuses ``vm``, None if it is admitted."""
    if claim is not None and snapshot.claim_hash is not None:
        if snapshot.claim_hash == claim.request_hash:
            return InsertOutcome("replayed", snapshot.claim_resource)
        return InsertOutcome("token_reused", snapshot.claim_resource)
    if snapshot.version_state is None or snapshot.version_state == "DELETED":
        return InsertOutcome("missing")
    if (
        snapshot.version_state not in runnable.states
        or snapshot.version_status not in runnable.statuses
    ):
        return InsertOutcome("conflict")
    if limits.max_microvms is not None and snapshot.account_vms + 1 > limits.max_microvms:
        return InsertOutcome("quota_microvms")
    if (
        limits.max_total_memory_mib is not None
        and snapshot.account_memory_mib + vm.memory_mib > limits.max_total_memory_mib
    ):
        return InsertOutcome("quota_memory")
    budget = limits.host_memory_budget_mib
    if budget is not None and snapshot.host_memory_mib + vm.memory_mib > budget:
        return InsertOutcome("capacity")
    return None

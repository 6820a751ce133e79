"""State of Embervm: images, versions, builds, microVMs, tags, idempotency, usage, hosts.

- ``records``: the rows as frozen dataclasses (what core sees).
- ``repository``: the ``Repository`` protocol core codes against, and its change types.
- ``schema``: the tables (SQLAlchemy Core); ``migrations/``: Alembic, run at start-up.
- ``engine``: engines (SQLite WAL by default, PostgreSQL by URL) and ``migrate``.
- ``hosts``: the ``HostRegistry`` protocol of the fleet's hosts (leases, epochs, LOST, drain).
- ``secrets``: the ``SecretStore`` protocol of the secrets a fleet's roles share (the fleet
  key, key rings such as the token keys).
- ``sql``: ``SqlRepository``, the implementation of all three (hosts: ``sql_hosts``, secrets:
  ``sql_secrets``).
- ``placement``: which fleet host takes a VM, chosen in the transaction that admits or
  resumes it (``AdmissionLimits.placement``).

``open_repository(url)`` is the one call the server needs: engine, migrations to head, repo.
"""

from __future__ import annotations

from embervm.store.engine import create_engine, current_revision, downgrade, migrate
from embervm.store.hosts import HostRegistry
from embervm.store.records import (
    ACTIVE_MICROVM_STATES,
    HOST_STATES,
    MEMORY_HOLDING_STATES,
    MICROVM_STATES,
    AdmissionLimits,
    BuildRecord,
    DeleteStatus,
    HostFence,
    HostRecord,
    HostState,
    IdempotencyClaim,
    ImageRecord,
    InsertOutcome,
    InsertStatus,
    MicrovmRecord,
    Placement,
    UsageRecord,
    VersionRecord,
)
from embervm.store.repository import (
    BuildChange,
    BuildFilter,
    Change,
    ImageChange,
    Page,
    Repository,
    RunnableVersion,
    Transition,
    VersionChange,
)
from embervm.store.secrets import TOKEN_KEYS, KeyRingState, RingKey, SecretStore
from embervm.store.sql import SqlRepository


async def open_repository(url: str, *, migrate_to: str | None = "head") -> SqlRepository:
    """Engine for ``url`` (see ``engine.normalize_url``), migrated to ``migrate_to``."""
    engine = create_engine(url)
    if migrate_to is not None:
        try:
            await migrate(engine, migrate_to)
        except BaseException:
            await engine.dispose()
            raise
    return SqlRepository(engine)


__all__ = [
    "ACTIVE_MICROVM_STATES",
    "HOST_STATES",
    "MEMORY_HOLDING_STATES",
    "MICROVM_STATES",
    "TOKEN_KEYS",
    "AdmissionLimits",
    "BuildChange",
    "BuildFilter",
    "BuildRecord",
    "Change",
    "DeleteStatus",
    "HostFence",
    "HostRecord",
    "HostRegistry",
    "HostState",
    "IdempotencyClaim",
    "ImageChange",
    "ImageRecord",
    "InsertOutcome",
    "InsertStatus",
    "KeyRingState",
    "MicrovmRecord",
    "Page",
    "Placement",
    "Repository",
    "RingKey",
    "RunnableVersion",
    "SecretStore",
    "SqlRepository",
    "Transition",
    "UsageRecord",
    "VersionChange",
    "VersionRecord",
    "create_engine",
    "current_revision",
    "downgrade",
    "migrate",
    "open_repository",
]

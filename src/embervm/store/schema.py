"""The tables (SQLAlchemy Core). Alembic migrations in ``migrations/`` create exactly these; a
test compares the migrated database with this metadata.

Timestamps use ``UtcDateTime``: aware UTC datetimes in and out on SQLite (which has no time
zones) and PostgreSQL (``timestamptz``) alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = sa.MetaData(naming_convention=NAMING)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes; naive values are refused (they would be ambiguous)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"unexpected timestamp value {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _seq() -> sa.Column[int]:
    return sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True)


images = sa.Table(
    "images",
    metadata,
    _seq(),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("arn", sa.String(2048), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text),
    sa.Column("next_version", sa.Integer, nullable=False),
    sa.Column("latest_active_version", sa.String(32)),
    sa.Column("latest_failed_version", sa.String(32)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("account_id", "name"),
)

image_versions = sa.Table(
    "image_versions",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("image_name", sa.String(64), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("memory_mib", sa.Integer, nullable=False),
    sa.Column("snapshot_dir", sa.Text),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

image_builds = sa.Table(
    "image_builds",
    metadata,
    _seq(),
    sa.Column("build_id", sa.String(64), nullable=False, unique=True),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("image_name", sa.String(64), nullable=False),
    sa.Column("version_number", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text),
    sa.Column("architecture", sa.String(16), nullable=False),
    sa.Column("chipset", sa.String(16), nullable=False),
    sa.Column("chipset_generation", sa.String(64), nullable=False),
    sa.Column("snapshot_build", sa.JSON),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("host_id", sa.String(64)),  # a fleet: the host running the build
    sa.Column("host_epoch", sa.Integer),
    sa.Index(None, "account_id", "image_name", "version_number"),
)

image_tags = sa.Table(
    "image_tags",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("image_name", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

microvms = sa.Table(
    "microvms",
    metadata,
    _seq(),
    sa.Column("microvm_id", sa.String(64), nullable=False, unique=True),
    sa.Column("account_id", sa.String(32), nullable=False),
    sa.Column("image_name", sa.String(64), nullable=False),
    sa.Column("image_arn", sa.String(2048), nullable=False),
    sa.Column("image_version", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("state_reason", sa.Text),
    sa.Column("endpoint", sa.String(2048), nullable=False),
    sa.Column("memory_mib", sa.Integer, nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("maximum_duration_seconds", sa.Integer, nullable=False),
    sa.Column("ingress", sa.JSON, nullable=False),
    sa.Column("egress", sa.JSON, nullable=False),
    sa.Column("idle_policy", sa.JSON),
    sa.Column("hooks", sa.JSON),
    sa.Column("logging", sa.JSON),
    sa.Column("run_hook_payload", sa.Text),
    sa.Column("execution_role_arn", sa.String(2048)),
    sa.Column("snapshot_dir", sa.Text),
    sa.Column("host_id", sa.String(64), nullable=False),
    sa.Column("host_epoch", sa.Integer),
    sa.Column("address", sa.String(256)),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("terminated_at", UtcDateTime),
    sa.Column("last_activity_at", UtcDateTime),
    sa.Column("suspended_at", UtcDateTime),
    sa.Column("running_since", UtcDateTime),
    sa.Column("last_snapshot_bytes", sa.BigInteger, nullable=False),
    sa.Index(None, "account_id", "state"),
    sa.Index(None, "state"),
    sa.Index(None, "host_id", "state"),
)
"""``host_id``: the host the VM is placed on (of a SUSPENDED VM whose host was lost: the last
one, a placement preference). ``host_epoch``: that host's epoch when the VM was placed on it
(None for a single-host server, and once the host is lost); a host's writes to the row check
it (``sql_hosts``)."""

usage = sa.Table(
    "usage",
    metadata,
    sa.Column("microvm_id", sa.String(64), primary_key=True),
    sa.Column("vcpu_seconds", sa.Float, nullable=False),
    sa.Column("gib_seconds", sa.Float, nullable=False),
    sa.Column("snapshot_bytes_written", sa.BigInteger, nullable=False),
    sa.Column("snapshot_bytes_read", sa.BigInteger, nullable=False),
)

idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("account_id", sa.String(32), primary_key=True),
    sa.Column("scope", sa.String(64), primary_key=True),
    sa.Column("client_token", sa.String(128), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("resource_id", sa.String(256), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("host_id", sa.String(64), primary_key=True),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("address", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("memory_total_mib", sa.Integer, nullable=False),
    sa.Column("memory_reserved_mib", sa.Integer, nullable=False),
    sa.Column("capabilities", sa.JSON, nullable=False),
    sa.Column("registered_at", UtcDateTime, nullable=False),
    sa.Column("heartbeat_at", UtcDateTime, nullable=False),
    sa.Column("lease_expires_at", UtcDateTime, nullable=False),
)
"""The fleet's hosts (``sql_hosts``): one row per ``--host-id``, its epoch bumped on every
registration, its lease judged by the database clock."""

locks = sa.Table(
    "locks",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
)
"""One row per serialization point (``admission``): writers that must see a consistent count
(quotas, capacity, idempotency) take its row lock first (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite serializes writers anyway)."""

ADMISSION_LOCK = "admission"

secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("ring", sa.String(64)),
    sa.Column("key_id", sa.String(64)),
    sa.Column("retired_at", UtcDateTime),
    sa.Column("version", sa.Integer),
)
"""The secrets every role of a fleet shares (``sql_secrets``): ``fleet-key`` (the tunnel's key);
per key ring (``token-keys``) a head row named after the ring (empty ``value``, its ``version``
bumped by every change; the ring's lock) and one row per key named ``<ring>/<key_id>`` (``ring``,
``key_id``, ``retired_at``: None for the current key)."""

"""Initial schema: images, versions, builds, tags, microvms, usage, idempotency, locks.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("arn", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text),
        sa.Column("next_version", sa.Integer, nullable=False),
        sa.Column("latest_active_version", sa.String(32)),
        sa.Column("latest_failed_version", sa.String(32)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_images"),
        sa.UniqueConstraint("account_id", "name", name="uq_images_account_id_name"),
    )
    op.create_table(
        "image_versions",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("image_name", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("memory_mib", sa.Integer, nullable=False),
        sa.Column("snapshot_dir", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("account_id", "image_name", "number", name="pk_image_versions"),
    )
    op.create_table(
        "image_builds",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("build_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("image_name", sa.String(64), nullable=False),
        sa.Column("version_number", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text),
        sa.Column("architecture", sa.String(16), nullable=False),
        sa.Column("chipset", sa.String(16), nullable=False),
        sa.Column("chipset_generation", sa.String(64), nullable=False),
        sa.Column("snapshot_build", sa.JSON),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_image_builds"),
        sa.UniqueConstraint("build_id", name="uq_image_builds_build_id"),
    )
    op.create_index(
        "ix_image_builds_account_id_image_name_version_number",
        "image_builds",
        ["account_id", "image_name", "version_number"],
    )
    op.create_table(
        "image_tags",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("image_name", sa.String(64), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("account_id", "image_name", "key", name="pk_image_tags"),
    )
    op.create_table(
        "microvms",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("microvm_id", sa.String(64), nullable=False),
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
        sa.Column("address", sa.String(256)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("terminated_at", TS),
        sa.Column("last_activity_at", TS),
        sa.Column("suspended_at", TS),
        sa.Column("running_since", TS),
        sa.Column("last_snapshot_bytes", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_microvms"),
        sa.UniqueConstraint("microvm_id", name="uq_microvms_microvm_id"),
    )
    op.create_index("ix_microvms_account_id_state", "microvms", ["account_id", "state"])
    op.create_index("ix_microvms_state", "microvms", ["state"])
    op.create_table(
        "usage",
        sa.Column("microvm_id", sa.String(64), nullable=False),
        sa.Column("vcpu_seconds", sa.Float, nullable=False),
        sa.Column("gib_seconds", sa.Float, nullable=False),
        sa.Column("snapshot_bytes_written", sa.BigInteger, nullable=False),
        sa.Column("snapshot_bytes_read", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("microvm_id", name="pk_usage"),
    )
    op.create_table(
        "idempotency",
        sa.Column("account_id", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(64), nullable=False),
        sa.Column("client_token", sa.String(128), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(256), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("account_id", "scope", "client_token", name="pk_idempotency"),
    )
    locks = op.create_table(
        "locks",
        sa.Column("name", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_locks"),
    )
    op.bulk_insert(locks, [{"name": "admission"}])


def downgrade() -> None:
    op.drop_table("locks")
    op.drop_table("idempotency")
    op.drop_table("usage")
    op.drop_index("ix_microvms_state", table_name="microvms")
    op.drop_index("ix_microvms_account_id_state", table_name="microvms")
    op.drop_table("microvms")
    op.drop_table("image_tags")
    op.drop_index("ix_image_builds_account_id_image_name_version_number", table_name="image_builds")
    op.drop_table("image_builds")
    op.drop_table("image_versions")
    op.drop_table("images")

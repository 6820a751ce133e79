"""The fleet's hosts: table ``hosts``; ``microvms.host_epoch`` and an index on the VMs of a host.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("host_id", sa.String(64), nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("address", sa.String(256), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("memory_total_mib", sa.Integer, nullable=False),
        sa.Column("memory_reserved_mib", sa.Integer, nullable=False),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("registered_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("lease_expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("host_id", name="pk_hosts"),
    )
    op.add_column("microvms", sa.Column("host_epoch", sa.Integer))
    op.create_index("ix_microvms_host_id_state", "microvms", ["host_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_microvms_host_id_state", table_name="microvms")
    with op.batch_alter_table("microvms") as batch:
        batch.drop_column("host_epoch")
    op.drop_table("hosts")

"""Which host runs a build in a fleet: ``image_builds.host_id`` and ``host_epoch`` (NULL on one
machine, and while a build waits for a host).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("image_builds") as batch:
        batch.add_column(sa.Column("host_id", sa.String(64)))
        batch.add_column(sa.Column("host_epoch", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("image_builds") as batch:
        batch.drop_column("host_epoch")
        batch.drop_column("host_id")

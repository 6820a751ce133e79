"""Alembic environment: always run programmatically by ``embervm.store.engine.migrate`` with
a connection handed over in ``config.attributes["connection"]`` (no ``alembic.ini``)."""

from __future__ import annotations

from alembic import context

from embervm.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()

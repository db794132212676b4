"""Alembic environment: syncd always hands in an open connection (see syncd.store.migrate)."""

from __future__ import annotations

from alembic import context

from syncd.store import models

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=models.SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

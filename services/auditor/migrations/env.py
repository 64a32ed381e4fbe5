"""Alembic environment: always handed a live connection by fedllm.services.auditor.migrate."""

from __future__ import annotations

from alembic import context

from fedllm.services.auditor.migrate import VERSION_TABLE
from fedllm.services.auditor.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()

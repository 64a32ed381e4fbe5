"""Alembic migrations of the audit store, run programmatically (see `migrate.py`)."""

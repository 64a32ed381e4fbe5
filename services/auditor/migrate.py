"""Run the auditor's Alembic migrations programmatically (idempotent, no alembic.ini)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

VERSION_TABLE = "auditor_alembic_version"  # own table: other services keep their own
MIGRATIONS = Path(__file__).with_name("migrations")
_LOCK_KEY = 0x6175646974  # 'audit': serialises concurrent migrators on Postgres


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the audit schema to `revision`; safe to run from several processes at once."""
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

"""Helpers for the auditor tests: audit events and stores on Postgres or SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

from fedllm.common.audit import audit_event
from fedllm.services.auditor.rows import Protection, event_to_row

NO_KEYS = Protection(hmac_key=None, sealer=None)


def event(i: int, *, tag: str = "t", at: datetime | None = None, **fields: Any) -> dict[str, Any]:
    """A deterministic AuditEvent record number `i`."""
    fields.setdefault("request_id", f"{tag}-req-{i}")
    fields.setdefault("user_id", f"user-{i % 3}")
    fields.setdefault("role", "clinician")
    fields.setdefault("department", ["cardiology", "emergency"][i % 2])
    fields.setdefault("source_address", "10.0.0.7")
    fields.setdefault("hospital_id", ["st_mary", "northside"][i % 2])
    rec = audit_event(
        action=fields.pop("action", "request.received"),
        service="gateway",
        id_parts=(tag, i),
        **fields,
    )
    if at is not None:
        rec["occurred_at_ms"] = int(at.timestamp() * 1000)
    return rec


def rows(events: list[dict[str, Any]], protection: Protection = NO_KEYS) -> list[dict[str, Any]]:
    return [event_to_row(e, protection) for e in events]


def ts(year: int, month: int = 1, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def as_superuser_untriggered(engine: Engine, sql: str, **params: Any) -> None:
    """Run tampering SQL with the append-only trigger disabled (Postgres) or dropped (SQLite)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
            conn.execute(text(sql), params)
            conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only"))
        else:
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_update"))
            conn.execute(text("DROP TRIGGER IF EXISTS audit_log_no_delete"))
            conn.execute(text(sql), params)

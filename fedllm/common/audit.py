"""Builds AuditEvent records. Ids are deterministic so that a replayed step is stored once."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any, cast

from fedllm.common.kafka import Bus, now_ms
from fedllm.common.topics import AUDIT
from fedllm.schemas.records import AuditEvent

_NAMESPACE = uuid.UUID("6f1c9a52-3f0e-4c86-9a55-5b8f6c1d2e7a")


def event_id(*parts: object) -> str:
    """A UUIDv5 of the parts: the same step replayed gives the same id."""
    return str(uuid.uuid5(_NAMESPACE, "|".join(str(p) for p in parts)))


def prompt_hmac(key: bytes, text: str) -> str:
    """Keyed HMAC-SHA256 of a text, for matching without storing it."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def audit_event(
    *, action: str, service: str, id_parts: tuple[object, ...], **fields: Any
) -> AuditEvent:
    """An AuditEvent record; unknown fields go into `details` as strings."""
    known = {
        "request_id",
        "user_id",
        "role",
        "department",
        "source_address",
        "hospital_id",
        "records_used",
        "outcome",
        "reason",
        "epsilon",
        "delta",
        "rdp_summary",
        "prompt_hmac",
    }
    details = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if k not in known
    }
    record: AuditEvent = {
        "event_id": event_id(service, action, *id_parts),
        "action": action,
        "service": service,
        "occurred_at_ms": now_ms(),
        "details": details,
    }
    return cast(AuditEvent, {k: v for k, v in fields.items() if k in known} | dict(record))


async def emit(bus: Bus, **kw: Any) -> None:
    """Build and send one AuditEvent to the audit topic."""
    record = audit_event(**kw)
    await bus.send(AUDIT, "AuditEvent", record, key=record.get("request_id") or record["service"])

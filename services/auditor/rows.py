"""AuditEvent (Avro record) → audit_log row fields, with clear text taken out.

Prompts and answers are never stored in clear. A detail under a clear-text key (prompt, answer,
...) is replaced by its keyed HMAC (`<key>_hmac`); with an encryption key configured, the texts
are also sealed (AES-GCM) into `sealed_text` with `key_id`. Without an HMAC key they are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedllm.schemas.records import AuditEvent
from fedllm.services.auditor.crypto import Sealer, derive_key, text_hmac
from fedllm.services.auditor.settings import AuditorSettings

CLEAR_TEXT_KEYS = frozenset(
    {
        "prompt",
        "prompt_text",
        "answer",
        "answer_text",
        "completion",
        "response",
        "question",
        "text",
        "input",
        "output",
        "messages",
    }
)
MAX_EVENT_ID = 200
MAIN_CHAIN = "main"


class InvalidEvent(ValueError):
    """An AuditEvent that decodes but cannot be stored (sent to the DLQ)."""


@dataclass(frozen=True, slots=True)
class Protection:
    """Keys for taking clear text out of events."""

    hmac_key: bytes | None
    sealer: Sealer | None
    chain_by: str = "main"

    @classmethod
    def from_settings(cls, cfg: AuditorSettings) -> Protection:
        key = cfg.encryption_key_bytes()
        hkey = cfg.hmac_key.get_secret_value().encode() or None
        if hkey is None and key is not None:
            hkey = derive_key(key, "fedllm-audit-hmac")
        sealer = Sealer(key, cfg.resolved_key_id()) if key is not None else None
        return cls(hmac_key=hkey, sealer=sealer, chain_by=cfg.chain_by)


def _clean(s: Any) -> str:
    """A string Postgres can store (no NUL)."""
    return str(s).replace("\x00", "\ufffd")


def chain_for(event: AuditEvent, chain_by: str) -> str:
    """'main', or the hospital id (per-hospital chains) when the event names one."""
    if chain_by == "hospital" and event.get("hospital_id"):
        return f"hospital:{_clean(event['hospital_id'])}"
    return MAIN_CHAIN


def event_to_row(event: AuditEvent, protection: Protection) -> dict[str, Any]:
    """Row fields (no seq, prev_hash, row_hash yet) for one decoded AuditEvent."""
    event_id = _clean(event.get("event_id", ""))
    if not event_id or len(event_id) > MAX_EVENT_ID:
        raise InvalidEvent(f"event_id empty or longer than {MAX_EVENT_ID}")
    details: dict[str, str] = {}
    clear: dict[str, str] = {}
    for k, v in sorted((event.get("details") or {}).items()):
        key = _clean(k)
        if key.lower() in CLEAR_TEXT_KEYS:
            clear[key] = _clean(v)
        else:
            details[key] = _clean(v)
    prompt_hmac = _clean(event.get("prompt_hmac", ""))
    sealed_text, key_id = "", ""
    if clear:
        if protection.hmac_key is not None:
            for k, v in clear.items():
                details[f"{k}_hmac"] = text_hmac(protection.hmac_key, v)
            if not prompt_hmac and "prompt" in clear:
                prompt_hmac = details["prompt_hmac"]
        else:
            details["clear_text_dropped"] = ",".join(sorted(clear))
        if protection.sealer is not None:
            sealed_text = protection.sealer.seal(event_id, json.dumps(clear, sort_keys=True))
            key_id = protection.sealer.key_id
    ms = int(event.get("occurred_at_ms", 0))
    try:
        occurred_at = datetime.fromtimestamp(ms / 1000, tz=UTC).replace(
            microsecond=(ms % 1000) * 1000
        )
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidEvent(f"occurred_at_ms out of range: {ms}") from exc
    epsilon, delta = float(event.get("epsilon", 0.0)), float(event.get("delta", 0.0))
    if (
        epsilon != epsilon
        or delta != delta
        or abs(epsilon) == float("inf")
        or abs(delta) == float("inf")
    ):
        raise InvalidEvent("epsilon/delta must be finite")
    return {
        "chain": chain_for(event, protection.chain_by),
        "event_id": event_id,
        "action": _clean(event.get("action", "")),
        "service": _clean(event.get("service", "")),
        "request_id": _clean(event.get("request_id", "")),
        "user_id": _clean(event.get("user_id", "")),
        "role": _clean(event.get("role", "")),
        "department": _clean(event.get("department", "")),
        "source_address": _clean(event.get("source_address", "")),
        "hospital_id": _clean(event.get("hospital_id", "")),
        "records_used": int(event.get("records_used", 0)),
        "outcome": _clean(event.get("outcome", "")),
        "reason": _clean(event.get("reason", "")),
        "epsilon": epsilon,
        "delta": delta,
        "rdp_summary": _clean(event.get("rdp_summary", "")),
        "prompt_hmac": prompt_hmac,
        "occurred_at": occurred_at,
        "details": details,
        "sealed_text": sealed_text,
        "key_id": key_id,
    }

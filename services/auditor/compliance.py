"""HIPAA-oriented compliance report over the audit store (read-only).

Checks: chain integrity (164.312(b)/(c)), retention ≥ 6 years (164.316(b)(2)(i)), encryption key
configured, no clear text stored, every request closed by a terminal record, and ε spent per
department in the period.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, case, func, select

from fedllm.services.auditor.chain import as_utc, iso_ms
from fedllm.services.auditor.crypto import is_sealed_token
from fedllm.services.auditor.rows import CLEAR_TEXT_KEYS
from fedllm.services.auditor.settings import SIX_YEARS_DAYS, AuditorSettings
from fedllm.services.auditor.tables import audit_log
from fedllm.services.auditor.verify import verify

TERMINAL_ACTIONS = ("request.completed", "request.rejected", "request.failed", "request.timeout")
BUDGET_COMMITTED = "budget.committed"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SHOW = 20


def clear_text_problems(row: dict[str, Any]) -> list[str]:
    """Why a row might hold clear text (empty when it stores only HMACs and ciphertext)."""
    out = []
    if row["prompt_hmac"] and not _HEX64.fullmatch(row["prompt_hmac"]):
        out.append("prompt_hmac is not a hex HMAC-SHA256")
    for k, v in (row["details"] or {}).items():
        if k.lower() in CLEAR_TEXT_KEYS:
            out.append(f"details.{k} holds clear text")
        elif k.endswith("_hmac") and not _HEX64.fullmatch(str(v)):
            out.append(f"details.{k} is not a hex HMAC-SHA256")
    if row["sealed_text"] and (not is_sealed_token(row["sealed_text"]) or not row["key_id"]):
        out.append("sealed_text is not an AES-GCM token with a key id")
    if row["rdp_summary"]:
        try:
            json.loads(row["rdp_summary"])
        except ValueError:
            out.append("rdp_summary is not JSON")
    return out


def _scan_clear_text(engine: Engine) -> dict[str, Any]:
    scanned, bad = 0, []
    cols = [
        audit_log.c.id,
        audit_log.c.event_id,
        audit_log.c.prompt_hmac,
        audit_log.c.details,
        audit_log.c.sealed_text,
        audit_log.c.key_id,
        audit_log.c.rdp_summary,
    ]
    with engine.connect() as conn:
        for m in conn.execution_options(yield_per=5000).execute(select(*cols)).mappings():
            scanned += 1
            for why in clear_text_problems(dict(m)):
                bad.append({"id": m["id"], "event_id": m["event_id"], "problem": why})
    return {"ok": not bad, "rows_scanned": scanned, "violations": len(bad), "examples": bad[:_SHOW]}


def _terminal(
    engine: Engine, since: datetime, until: datetime, grace_s: float, now: datetime
) -> dict[str, Any]:
    is_terminal = case((audit_log.c.action.in_(TERMINAL_ACTIONS), 1), else_=0)
    first = func.min(audit_log.c.occurred_at)
    q = (
        select(audit_log.c.request_id, first.label("first"), func.sum(is_terminal).label("t"))
        .where(audit_log.c.request_id != "")
        .group_by(audit_log.c.request_id)
        .having(first >= since, first < until)
    )
    total, missing, open_ = 0, [], 0
    with engine.connect() as conn:
        for rid, first_at, t in conn.execute(q):
            total += 1
            if t:
                continue
            if as_utc(first_at) > now - timedelta(seconds=grace_s):
                open_ += 1
            else:
                missing.append(rid)
    return {
        "ok": not missing,
        "requests": total,
        "closed": total - len(missing) - open_,
        "in_flight": open_,
        "missing_terminal": len(missing),
        "examples": sorted(missing)[:_SHOW],
        "terminal_actions": list(TERMINAL_ACTIONS),
    }


def _epsilon(engine: Engine, since: datetime, until: datetime) -> dict[str, float]:
    q = (
        select(audit_log.c.department, func.sum(audit_log.c.epsilon))
        .where(
            audit_log.c.action == BUDGET_COMMITTED,
            audit_log.c.occurred_at >= since,
            audit_log.c.occurred_at < until,
        )
        .group_by(audit_log.c.department)
        .order_by(audit_log.c.department)
    )
    with engine.connect() as conn:
        return {d or "(none)": float(s or 0.0) for d, s in conn.execute(q)}


def report(
    engine: Engine,
    cfg: AuditorSettings,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    request_grace_s: float = 180.0,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The compliance report as a JSON-able dict; `ok` is the conjunction of the checks."""
    now = now or datetime.now(UTC)
    since = as_utc(since) if since else datetime(1970, 1, 1, tzinfo=UTC)
    until = as_utc(until) if until else now + timedelta(seconds=1)
    integrity = verify(engine)
    out: dict[str, Any] = {
        "generated_at": iso_ms(now),
        "period": {"since": iso_ms(since), "until": iso_ms(until)},
        "chain_integrity": {"ok": integrity.ok, "chains": integrity.lines()},
        "retention": {
            "ok": cfg.retention_days >= SIX_YEARS_DAYS,
            "retention_days": cfg.retention_days,
            "required_days": SIX_YEARS_DAYS,
        },
        "encryption": {
            "ok": cfg.encryption_key_bytes() is not None,
            "key_id": cfg.resolved_key_id(),
            "cipher": "AES-256-GCM",
        },
        "clear_text": _scan_clear_text(engine),
        "terminal_records": _terminal(engine, since, until, request_grace_s, now),
        "epsilon_by_department": _epsilon(engine, since, until),
    }
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict) and "ok" in v)
    return out


def lines(rep: dict[str, Any]) -> list[str]:
    """A human-readable rendering of `report`."""
    mark = {True: "PASS", False: "FAIL"}
    t, c = rep["terminal_records"], rep["clear_text"]
    out = [
        f"period {rep['period']['since']} .. {rep['period']['until']}",
        f"{mark[rep['chain_integrity']['ok']]} chain integrity",
        *[f"    {line}" for line in rep["chain_integrity"]["chains"]],
        f"{mark[rep['retention']['ok']]} retention {rep['retention']['retention_days']} days "
        f"(≥ {rep['retention']['required_days']} required)",
        f"{mark[rep['encryption']['ok']]} encryption key configured"
        + (f" (key id {rep['encryption']['key_id']})" if rep["encryption"]["ok"] else ""),
        f"{mark[c['ok']]} no clear text stored ({c['rows_scanned']} rows scanned, "
        f"{c['violations']} violations)",
        f"{mark[t['ok']]} terminal record per request: {t['requests']} requests, "
        f"{t['closed']} closed, {t['in_flight']} in flight, {t['missing_terminal']} missing",
        "epsilon spent per department (budget.committed):",
        *[f"    {d}: {e:.6g}" for d, e in rep["epsilon_by_department"].items()],
        "COMPLIANT" if rep["ok"] else "NOT COMPLIANT",
    ]
    return out

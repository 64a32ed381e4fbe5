"""The compliance report's fields."""

from __future__ import annotations

import base64
import json

import pytest
from sqlalchemy import Engine

from fedllm.services.auditor import compliance
from fedllm.services.auditor.settings import AuditorSettings
from fedllm.services.auditor.store import append
from tests.auditor.helpers import as_superuser_untriggered, event, rows, ts

NOW = ts(2030, 3, 1)


def _fill(engine: Engine) -> None:
    evs = []
    for i in range(6):
        evs.append(event(i, at=ts(2030, 2, 1)))
        evs.append(
            event(
                i,
                action="budget.committed",
                at=ts(2030, 2, 1),
                epsilon=0.5 + i,
                department=["cardiology", "emergency"][i % 2],
            )
        )
        if i != 3:
            evs.append(
                event(i, action=["request.completed", "request.rejected"][i % 2], at=ts(2030, 2, 1))
            )
    evs.append(event(99, at=NOW))  # in flight: not yet overdue
    evs.append(event(98, action="budget.committed", at=ts(2029, 1, 1), epsilon=100.0))
    append(engine, rows(evs))


def test_report_fields(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(engine)
    monkeypatch.setenv("FEDLLM_AUDIT_ENCRYPTION_KEY", base64.b64encode(b"k" * 32).decode())
    rep = compliance.report(engine, AuditorSettings(), since=ts(2030), now=NOW)
    json.dumps(rep)
    assert rep["chain_integrity"]["ok"] and rep["retention"]["ok"] and rep["encryption"]["ok"]
    assert rep["clear_text"] == {"ok": True, "rows_scanned": 19, "violations": 0, "examples": []}
    t = rep["terminal_records"]
    assert (t["requests"], t["closed"], t["in_flight"], t["missing_terminal"]) == (7, 5, 1, 1)
    assert t["examples"] == ["t-req-3"] and not t["ok"] and not rep["ok"]
    assert rep["epsilon_by_department"] == {
        "cardiology": 0.5 + 2.5 + 4.5,
        "emergency": 1.5 + 3.5 + 5.5,
    }
    assert "NOT COMPLIANT" in compliance.lines(rep)[-1]


def test_report_flags_missing_key_short_retention_clear_text_and_tamper(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(engine)
    monkeypatch.setenv("FEDLLM_AUDIT_RETENTION_DAYS", "365")
    as_superuser_untriggered(
        engine, "UPDATE audit_log SET prompt_hmac = 'what is my diagnosis' WHERE seq = 2"
    )
    rep = compliance.report(engine, AuditorSettings(), since=ts(2030), now=NOW)
    assert not rep["retention"]["ok"] and not rep["encryption"]["ok"]
    assert not rep["chain_integrity"]["ok"]
    assert rep["clear_text"]["violations"] == 1
    assert rep["clear_text"]["examples"][0]["problem"] == "prompt_hmac is not a hex HMAC-SHA256"

"""Clear text never reaches a row: keyed HMAC, optional AES-GCM sealing with a key id."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidTag

from fedllm.common.audit import prompt_hmac
from fedllm.services.auditor.rows import InvalidEvent, Protection, event_to_row
from fedllm.services.auditor.settings import AuditorSettings
from tests.auditor.helpers import NO_KEYS, event

KEY = base64.b64encode(bytes(range(32))).decode()


def _cfg(monkeypatch: pytest.MonkeyPatch) -> AuditorSettings:
    monkeypatch.setenv("FEDLLM_AUDIT_ENCRYPTION_KEY", KEY)
    monkeypatch.setenv("FEDLLM_AUDIT_KEY_ID", "k2031")
    monkeypatch.setenv("FEDLLM_AUDIT_HMAC_KEY", "hmac-secret")
    return AuditorSettings()


def test_clear_text_is_hmaced_and_sealed(monkeypatch: pytest.MonkeyPatch) -> None:
    prot = Protection.from_settings(_cfg(monkeypatch))
    ev = event(1, prompt="chest pain, 54 y/o", answer="consider troponin")
    row = event_to_row(ev, prot)
    flat = json.dumps({k: str(v) for k, v in row.items()})
    assert "chest pain" not in flat and "troponin" not in flat
    assert row["details"]["prompt_hmac"] == prompt_hmac(b"hmac-secret", "chest pain, 54 y/o")
    assert row["prompt_hmac"] == row["details"]["prompt_hmac"]
    assert row["key_id"] == "k2031"
    assert json.loads(prot.sealer.open(row["event_id"], row["sealed_text"])) == {
        "answer": "consider troponin",
        "prompt": "chest pain, 54 y/o",
    }
    # Deterministic (replays match) and bound to the event id.
    assert event_to_row(ev, prot)["sealed_text"] == row["sealed_text"]
    with pytest.raises(InvalidTag):
        prot.sealer.open("another-event", row["sealed_text"])


def test_without_keys_clear_text_is_dropped() -> None:
    row = event_to_row(event(1, prompt="secret"), NO_KEYS)
    assert "prompt" not in row["details"] and row["details"]["clear_text_dropped"] == "prompt"
    assert row["sealed_text"] == ""


def test_bad_key_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_AUDIT_ENCRYPTION_KEY", base64.b64encode(b"short").decode())
    with pytest.raises(ValueError, match="32 bytes"):
        AuditorSettings()


def test_invalid_events_refused() -> None:
    with pytest.raises(InvalidEvent):
        event_to_row({**event(1), "event_id": ""}, NO_KEYS)
    with pytest.raises(InvalidEvent):
        event_to_row({**event(1), "epsilon": float("nan")}, NO_KEYS)
    assert event_to_row({**event(1), "reason": "a\x00b"}, NO_KEYS)["reason"] == "a\ufffdb"

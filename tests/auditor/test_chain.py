"""Canonical JSON (RFC 8785 number and key rules) and the row hash."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from fedllm.services.auditor.chain import GENESIS, canonical_json, es_number, hashed_view, row_hash
from tests.auditor.helpers import event, rows


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (5.0, "5"),
        (1e-5, "0.00001"),
        (1e-7, "1e-7"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (-2.5, "-2.5"),
        (123.456, "123.456"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
    ],
)
def test_numbers_are_ecmascript_shortest(value: float, text: str) -> None:
    assert es_number(value) == text


def test_canonical_json_sorts_keys_by_utf16_and_has_no_whitespace() -> None:
    # U+E000 sorts before U+1F600 in UTF-16 (surrogates D83D..) but after it by code point.
    obj = {"b": [1.0, "x\n"], "a": None, "\U0001f600": 1, "\ue000": 2}
    assert canonical_json(obj) == '{"a":null,"b":[1,"x\\n"],"\U0001f600":1,"\ue000":2}'.encode()


def test_row_hash_is_sha256_of_prev_and_canonical_row() -> None:
    row = {**rows([event(1)])[0], "seq": 1}
    want = hashlib.sha256(GENESIS.encode() + canonical_json(hashed_view(row))).hexdigest()
    assert row_hash(GENESIS, row) == want
    assert row_hash(GENESIS, {**row, "action": "x"}) != want
    assert row_hash("1" * 64, row) != want


def test_fast_row_serialiser_agrees_with_the_generic_one() -> None:
    from fedllm.services.auditor.chain import canonical_row_json

    odd = ["\U0001f600x", "a\\u0000b", "\x00", '\u2028"\\', "\x7f\x1f"]
    for i in range(60):
        extra = {"\ue000k": "v"} if i % 3 == 0 else {f"k{i}": odd[i % len(odd)]}
        row = {
            **rows(
                [
                    event(
                        i,
                        epsilon=[i * 1e-7, 1e21, 5.0, 0.25, 1e16][i % 5],
                        delta=[1e-5, 0.0, 1e-300][i % 3],
                        reason=odd[i % len(odd)],
                        **extra,
                    )
                ]
            )[0],
            "seq": i * 2**50,
        }
        assert canonical_row_json(hashed_view(row)) == canonical_json(hashed_view(row))


# A row hashed by the chain as stored: these values must never change, or stored chains stop
# verifying (the canonical text is spelled out, so the hash is checked independently too).
KNOWN_ROW: dict[str, object] = {
    "chain": "main",
    "seq": 7,
    "event_id": "6f1c9a52-0000-5000-8000-000000000007",
    "action": "budget.settle",
    "service": "accountant",
    "request_id": "req-7",
    "user_id": "dr-ann",
    "role": "clinician",
    "department": "cardiology",
    "source_address": "10.0.0.7",
    "hospital_id": "st_mary",
    "records_used": 0,
    "outcome": "accepted",
    "reason": "",
    "epsilon": 0.5,
    "delta": 1e-05,
    "rdp_summary": "rho=0.0125",
    "prompt_hmac": "ab" * 32,
    "occurred_at": datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC),
    "details": {"units": "12", "note": "caf\u00e9"},
    "sealed_text": None,
    "key_id": None,
}
KNOWN_TEXT = (
    '{"action":"budget.settle","chain":"main","delta":0.00001,"department":"cardiology",'
    '"details":{"note":"caf\u00e9","units":"12"},"epsilon":0.5,'
    '"event_id":"6f1c9a52-0000-5000-8000-000000000007","hospital_id":"st_mary","key_id":"",'
    '"occurred_at":"2026-11-29T12:00:00.123Z","outcome":"accepted",'
    '"prompt_hmac":"' + "ab" * 32 + '","rdp_summary":"rho=0.0125","reason":"",'
    '"records_used":0,"request_id":"req-7","role":"clinician","sealed_text":"","seq":7,'
    '"service":"accountant","source_address":"10.0.0.7","user_id":"dr-ann"}'
)
KNOWN_HASH = "45faa1fc8a8b232fe3387cf6e7e0d75c154c59f4d06eace8facc16eaf5abd805"
KNOWN_NEXT = "3527aed21708454c95d0d45f6fda20da4c286124bbd3176f86d1a4a6751af946"  # seq 8 on it


def test_row_hash_of_a_known_row_is_fixed() -> None:
    assert canonical_json(hashed_view(KNOWN_ROW)) == KNOWN_TEXT.encode()
    assert hashlib.sha256(GENESIS.encode() + KNOWN_TEXT.encode()).hexdigest() == KNOWN_HASH
    assert row_hash(GENESIS, KNOWN_ROW) == KNOWN_HASH
    assert row_hash(KNOWN_HASH, {**KNOWN_ROW, "seq": 8}) == KNOWN_NEXT

"""Canonical JSON (RFC 8785 number and key rules) and the row hash."""

from __future__ import annotations

import hashlib

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

"""The shared aggregate-query grammar never raises anything but a ValueError naming the problem."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings

from fedllm.common.aggregate_query import parse_query
from tests.gateway.test_fuzz_bodies import QUERIES, VALUES


@pytest.mark.slow  # 500 generated queries: seconds
@given(q=QUERIES | VALUES)
@hyp_settings(max_examples=500, deadline=None, derandomize=True)
def test_parse_query_raises_only_value_error(q: object) -> None:
    for form in (q, json.dumps(q, allow_nan=True)):
        try:
            parse_query(form)  # type: ignore[arg-type]
        except ValueError as exc:
            str(exc).encode("utf-8", "backslashreplace")
            assert len(str(exc)) < 400


def test_parse_query_refuses_deep_and_huge_json_text() -> None:
    with pytest.raises(ValueError):
        parse_query("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError):
        parse_query('{"op": "count", "top": ' + "9" * 5000 + "}")
    assert math.isfinite(parse_query({"op": "mean", "field": "age"}).bounds[1])  # type: ignore[index]

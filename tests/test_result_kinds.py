"""`fedllm.common.results.result_kind`: the kind field wins; legacy records (kind "") are read
the way the node-results readers used to tell them apart."""

from __future__ import annotations

import pytest

from fedllm.common.results import from_router, result_kind


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ({"status": "ok", "node_id": "st_mary"}, "answer"),
        ({"status": "failed", "node_id": "st_mary"}, "answer"),
        ({"status": "partial", "node_id": "st_mary"}, "part"),
        ({"status": "failed", "node_id": ""}, "verdict"),
        ({"status": "ok", "node_id": "a,b"}, "combined"),
    ],
)
def test_legacy_records_are_inferred(record: dict[str, str], kind: str) -> None:
    assert result_kind({**record, "kind": ""}) == kind
    assert result_kind(record) == kind  # a record decoded without the field at all


@pytest.mark.parametrize("kind", ["answer", "part", "verdict", "combined", "final"])
def test_an_explicit_kind_overrides_status_and_node_id(kind: str) -> None:
    # Every combination the heuristics would read differently: the field decides.
    for status, node_id in (("ok", "st_mary"), ("partial", "x"), ("failed", ""), ("ok", "a,b")):
        assert result_kind({"status": status, "node_id": node_id, "kind": kind}) == kind


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown result kind"):
        result_kind({"status": "ok", "node_id": "", "kind": "answr"})


def test_from_router() -> None:
    assert from_router({"status": "failed", "node_id": "st_mary", "kind": "verdict"})
    assert from_router({"status": "ok", "node_id": "a,b"})
    assert not from_router({"status": "failed", "node_id": "", "kind": "answer"})

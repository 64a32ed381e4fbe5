"""Consensus (require_consensus): k eligible hospitals serving the department, a combined answer
with consensus_reached and a confidence_score computed from the DP releases only."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedllm.common import codec, topics
from fedllm.common.aggregates import parse_part
from fedllm.common.residency import RegionPolicy
from fedllm.services.router.consensus import consensus_of
from fedllm.services.router.dispatcher import Dispatcher
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import decision, heartbeat
from tests.router.test_fanout import agg, part, sends

POP = {"a": 100, "b": 100, "c": 100, "d": 100}


def make(
    k: int = 2, *, regions: RegionPolicy | None = None, queue: dict | None = None
) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5.0),
        strategy=DepartmentLeastLoad(),
        node_timeout_s=5.0,
        regions=regions,
        consensus_k=k,
        population=POP,
    )
    for h, depts in (("a", ("general",)), ("b", ("general",)), ("c", ("general",)), ("d", ("x",))):
        q = (queue or {}).get(h, 0)
        d.on_heartbeat(heartbeat(h, departments=depts, queue_depth=q, sent_at_ms=0), now_ms=0)
    return d


def consensus_req(rid: str, **kw: Any) -> dict[str, Any]:
    req = agg(rid, ())
    req.update(require_consensus=True, **kw)
    return req


def count_part(req: dict[str, Any], node: str, value: int, sd: float = 2.0) -> dict[str, Any]:
    release = {
        "op": "count",
        "field": None,
        "query_key": json.dumps({"op": "count"}),
        "noisy_count": value,
        "count_sd": sd,
    }
    return part(req, node, share=0.5, release=release)


def test_fans_out_to_the_k_least_loaded_hospitals_serving_the_department() -> None:
    d = make(k=2, queue={"a": 9})
    req = consensus_req("r1")
    out = sends(d.on_decision(decision(req, at_ms=0), now_ms=0))
    assert sorted(s.topic for s in out) == [topics.hospital_requests(h) for h in ("b", "c")]
    assert all(s.record["parts"] == 2 and s.record["budget_share"] == 0.5 for s in out)


def test_agreeing_hospitals_reach_consensus_and_the_answer_is_combined() -> None:
    d = make(k=2)
    req = consensus_req("r2")
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    d.on_node_result(count_part(req, "a", 30), now_ms=1)
    (res,) = [s.record for s in sends(d.on_node_result(count_part(req, "b", 32), now_ms=2))]
    assert res["status"] == "ok" and res["consensus_reached"] is True
    assert res["confidence_score"] == pytest.approx(1.0)  # difference within the DP noise
    assert "Consensus across 2 hospitals: reached" in res["response"]
    assert json.loads(res["aggregate_json"])["noisy_count"] == 62  # the combined release
    codec.encode("InferenceResult", res)  # the new fields are in the schema


def test_disagreeing_hospitals_do_not_reach_consensus() -> None:
    d = make(k=2)
    req = consensus_req("r3")
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    d.on_node_result(count_part(req, "a", 5), now_ms=1)
    (res,) = [s.record for s in sends(d.on_node_result(count_part(req, "b", 80), now_ms=2))]
    assert res["consensus_reached"] is False and res["confidence_score"] < 0.05
    assert "not reached" in res["response"]


def test_fewer_than_k_eligible_fails_with_the_reason_never_a_single_answer() -> None:
    d = make(k=4)  # only a, b, c serve "general"
    actions = d.on_decision(decision(consensus_req("r4"), at_ms=0), now_ms=0)
    (res,) = [s.record for s in sends(actions)]
    assert res["status"] == "failed" and res["reason"].startswith("consensus unavailable")
    assert "needs 4 eligible hospitals serving general" in res["reason"]
    assert not [s for s in sends(actions) if s.topic.startswith("hospital.")]


def test_consensus_respects_residency() -> None:
    regions = RegionPolicy(
        hospital_region={"a": "EU", "b": "US", "c": "US"},
        department_regions={"general": frozenset({"EU"})},
    )
    res = sends(
        make(k=2, regions=regions).on_decision(decision(consensus_req("r5"), at_ms=0), now_ms=0)
    )
    assert res[0].record["status"] == "failed" and "1 eligible" in res[0].record["reason"]


def test_text_requests_are_refused_for_consensus() -> None:
    req = consensus_req("r6", kind="generate")
    (res,) = [s.record for s in sends(make().on_decision(decision(req, at_ms=0), now_ms=0))]
    assert "only aggregate queries" in res["reason"]


def _mean_part(req: dict[str, Any], node: str, mean: float, count: int = 200) -> Any:
    release = {
        "op": "mean",
        "field": "age",
        "query_key": json.dumps({"op": "mean", "field": "age"}),
        "bounds": [0, 100],
        "noisy_count": count,
        "noisy_sum": mean * count,
        "count_sd": 3.0,
        "sum_sd": 150.0,
    }
    return parse_part(part(req, node, share=0.5, release=release))


def test_mean_and_histogram_scores() -> None:
    req = consensus_req("m")
    close = consensus_of([_mean_part(req, "a", 50), _mean_part(req, "b", 51)], population={})
    far = consensus_of([_mean_part(req, "a", 30), _mean_part(req, "b", 70)], population={})
    assert close.reached and not far.reached and far.confidence < close.confidence

    def hist(node: str, counts: dict[str, int]) -> Any:
        rel = {
            "op": "histogram",
            "field": "diagnosis",
            "query_key": "h",
            "top": 2,
            "histogram": [[k, c] for k, c in counts.items()],
        }
        return parse_part(part(req, node, share=0.5, release=rel))

    same = consensus_of(
        [hist("a", {"E11": 9, "I10": 8, "J45": 1}), hist("b", {"E11": 7, "I10": 9, "J45": 2})],
        population={},
    )
    diff = consensus_of(
        [
            hist("a", {"E11": 9, "I10": 8, "J45": 1}),
            hist("b", {"E11": 1, "I10": 2, "J45": 9, "K21": 8}),
        ],
        population={},
    )
    assert same.confidence == 1.0 and same.reached
    assert diff.confidence == 0.0 and not diff.reached


def test_count_without_public_population_is_not_a_consensus() -> None:
    req = consensus_req("p")
    parts = [parse_part(count_part(req, h, 30)) for h in ("a", "b")]
    c = consensus_of(parts, population={})
    assert not c.reached and c.confidence == 0.0 and "unavailable" in c.method

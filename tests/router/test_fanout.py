"""Fan-out aggregates (pure): one part per hospital with a 1/k budget share, combine, failure."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fedllm.common import codec, topics
from fedllm.common.aggregates import combine_parts, parse_part
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.router.dispatcher import Action, Audit, Dispatcher, Send
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import decision, heartbeat, request

DELTA = 1e-5
COUNT_KEY = json.dumps({"op": "count", "diagnosis": "E11"})


def make(*hospitals: str, node_timeout_s: float = 1.0) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5.0),
        strategy=DepartmentLeastLoad(),
        node_timeout_s=node_timeout_s,
    )
    for h in hospitals:
        d.on_heartbeat(heartbeat(h, sent_at_ms=0), now_ms=0)
    return d


def agg(rid: str, hospitals: tuple[str, ...], *, kind: str = "aggregate") -> dict[str, Any]:
    req = request(rid, hospitals=hospitals, created_ms=0, deadline_ms=10_000)
    req.update(kind=kind, prompt=json.dumps({"op": "count", "where": {"diagnosis": "E11"}}))
    return req


def sends(actions: list[Action], topic: str | None = None) -> list[Send]:
    return [a for a in actions if isinstance(a, Send) and (topic is None or a.topic == topic)]


def audits(actions: list[Action]) -> list[str]:
    return [a.action for a in actions if isinstance(a, Audit)]


def part(
    req: dict[str, Any],
    node: str,
    *,
    share: float,
    release: dict[str, Any] | None = None,
    status: str = "partial",
    records: int = 20,
) -> dict[str, Any]:
    curve = PrivacyCurve.from_rho(share * rho_for_epsilon(epsilon=req["epsilon"], delta=DELTA))
    release = release or {
        "op": "count",
        "field": None,
        "query_key": COUNT_KEY,
        "noisy_count": 10,
        "count_sd": 2.0,
    }
    return {
        "request_id": req["request_id"],
        "user_id": req["user_id"],
        "department": req["department"],
        "status": status,
        "node_id": node,
        "attempt": 1,
        "is_private": status == "partial",
        "privacy_cost": curve.epsilon(delta=DELTA),
        "delta": DELTA,
        "rdp_orders": list(curve.orders),
        "rdp_epsilons": list(curve.values),
        "records_used": records,
        "aggregate_json": json.dumps(release) if status == "partial" else "",
        "reason": "" if status == "partial" else "boom",
        "finished_at_ms": 5,
    }


def test_aggregate_naming_two_hospitals_fans_out_with_half_shares() -> None:
    d = make("a", "b", "c")
    req = agg("r1", ("a", "b"))
    actions = d.on_decision(decision(req, at_ms=0), now_ms=0)
    parts = sends(actions)
    assert [s.topic for s in parts] == [
        topics.hospital_requests("a"),
        topics.hospital_requests("b"),
    ]
    for s in parts:
        assert s.record["budget_share"] == 0.5 and s.record["parts"] == 2
        assert s.record["attempt"] == 1 and s.record["deadline_ms"] == 1000
        assert s.record["reserved_epsilon"] == req["epsilon"]
        codec.encode("RoutedRequest", s.record)
    assert audits(actions) == ["request.routed", "request.routed"]
    assert d.on_decision(decision(req, at_ms=0), now_ms=1) == []  # replay


def test_all_parts_combine_into_one_ok_result_with_the_summed_curve() -> None:
    d = make("a", "b")
    req = agg("r2", ("a", "b"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    pa, pb = part(req, "a", share=0.5), part(req, "b", share=0.5, records=30)
    assert d.on_node_result(pa, now_ms=10) == []
    assert d.on_node_result(pa, now_ms=11) == []  # duplicate
    actions = d.on_node_result(pb, now_ms=12)
    (send,) = sends(actions, topics.NODE_RESULTS)
    res = send.record
    assert res["status"] == "ok" and res["node_id"] == "a,b" and res["is_private"]
    summed = PrivacyCurve(pa["rdp_orders"], pa["rdp_epsilons"]) + PrivacyCurve(
        pb["rdp_orders"], pb["rdp_epsilons"]
    )
    assert res["rdp_epsilons"] == pytest.approx(list(summed.values))
    assert res["privacy_cost"] == pytest.approx(summed.epsilon(delta=DELTA))
    assert res["privacy_cost"] <= req["epsilon"] + 1e-9  # two half shares fit the reservation
    assert res["records_used"] == 50 and res["tokens"] == 0
    assert "About 20 patients" in res["response"] and "2 hospitals" in res["response"]
    assert json.loads(res["aggregate_json"])["noisy_count"] == 20
    assert audits(actions) == ["request.combined"]
    codec.encode("InferenceResult", res)
    assert d.is_finished("r2") and d.fan_outs == {}
    assert d.on_node_result(res, now_ms=13) == []  # our own verdict, read back


def test_silent_part_fails_the_request_carrying_the_answered_parts_curve() -> None:
    d = make("a", "b", "c", node_timeout_s=1)
    req = agg("r3", ("a", "b", "c"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    pa = part(req, "a", share=1 / 3)
    d.on_node_result(pa, now_ms=10)
    d.on_node_result(part(req, "b", share=1 / 3), now_ms=20)
    assert d.tick(now_ms=999) == []
    actions = d.tick(now_ms=1000)
    (send,) = sends(actions, topics.NODE_RESULTS)
    res = send.record
    assert res["status"] == "failed" and res["node_id"] == ""
    assert "c did not answer in time" in res["reason"] and "partial release" in res["reason"]
    two = 2 * PrivacyCurve(pa["rdp_orders"], pa["rdp_epsilons"])
    assert res["rdp_epsilons"] == pytest.approx(list(two.values))
    assert res["privacy_cost"] == pytest.approx(two.epsilon(delta=DELTA))
    assert audits(actions) == ["request.route_failed"]
    codec.encode("InferenceResult", res)
    assert d.on_node_result(part(req, "c", share=1 / 3), now_ms=1100) == []  # too late


def test_failed_part_fails_at_once_and_no_answer_means_no_curve() -> None:
    d = make("a", "b")
    req = agg("r4", ("a", "b"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    d.on_node_result(part(req, "a", share=0.5), now_ms=5)
    (send,) = sends(d.on_node_result(part(req, "b", share=0.5, status="failed"), now_ms=6))
    assert send.record["status"] == "failed" and "node b answered failed" in send.record["reason"]
    assert send.record["rdp_orders"]

    req = agg("r5", ("a", "b"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    (send,) = sends(d.on_node_result(part(req, "a", share=0.5, status="timeout"), now_ms=6))
    assert send.record["status"] == "failed" and "rdp_orders" not in send.record
    assert "partial release" not in send.record["reason"]


def test_named_hospital_down_fails_before_anything_is_sent() -> None:
    d = make("a")
    actions = d.on_decision(decision(agg("r6", ("a", "zz")), at_ms=0), now_ms=0)
    (send,) = sends(actions)
    assert send.topic == topics.NODE_RESULTS and send.record["status"] == "failed"
    assert "zz not alive" in send.record["reason"] and send.record["attempt"] == 0


def test_node_leaving_fails_its_fan_outs() -> None:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=1.0), strategy=DepartmentLeastLoad(), node_timeout_s=10
    )
    d.on_heartbeat(heartbeat("a", sent_at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("b", sent_at_ms=0), now_ms=0)
    req = agg("r7", ("a", "b"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("a", sent_at_ms=900), now_ms=900)
    actions = d.tick(now_ms=1500)
    (send,) = sends(actions, topics.NODE_RESULTS)
    assert "node b left the registry" in send.record["reason"]


def test_star_means_every_healthy_node_and_one_node_routes_normally() -> None:
    d = make("a", "b", "c")
    d.on_heartbeat(heartbeat("c", healthy=False, sent_at_ms=1), now_ms=1)
    parts = sends(d.on_decision(decision(agg("r8", ("*",)), at_ms=0), now_ms=2))
    assert sorted(s.record["hospital_id"] for s in parts) == ["a", "b"]

    single = make("a")
    (send,) = sends(single.on_decision(decision(agg("r9", ("*",)), at_ms=0), now_ms=0))
    assert send.topic == topics.hospital_requests("a") and "parts" not in send.record
    assert send.record["request"]["hospitals"] == []


def test_generate_and_single_hospital_aggregates_are_not_fanned_out() -> None:
    d = make("a", "b")
    (send,) = sends(
        d.on_decision(decision(agg("g1", ("a", "b"), kind="generate"), at_ms=0), now_ms=0)
    )
    assert "budget_share" not in send.record  # schema default 1.0
    (send,) = sends(d.on_decision(decision(agg("g2", ("b",)), at_ms=0), now_ms=0))
    assert send.topic == topics.hospital_requests("b") and "parts" not in send.record


def _p(node: str, release: dict[str, Any], delta: float = DELTA) -> Any:
    curve = PrivacyCurve.from_rho(0.01)
    return parse_part(
        {
            "node_id": node,
            "rdp_orders": list(curve.orders),
            "rdp_epsilons": list(curve.values),
            "delta": delta,
            "records_used": 7,
            "aggregate_json": json.dumps(release),
        }
    )


def test_combine_sums_and_means() -> None:
    key = json.dumps({"op": "mean", "field": "age"})
    mean = [
        _p(
            h,
            {
                "op": "mean",
                "field": "age",
                "query_key": key,
                "bounds": [0, 100],
                "noisy_count": c,
                "noisy_sum": s,
                "count_sd": 1.0,
                "sum_sd": 3.0,
            },
        )
        for h, c, s in (("a", 10, 400.0), ("b", 30, 2000.0))
    ]
    out = combine_parts(mean)
    assert out.value == pytest.approx(2400 / 40) and out.records_used == 14
    assert out.release["sum_sd"] == pytest.approx(3 * 2**0.5)
    assert out.curve == PrivacyCurve.from_rho(0.02)
    assert out.epsilon == pytest.approx(PrivacyCurve.from_rho(0.02).epsilon(delta=DELTA))
    clamped = combine_parts([_p("a", {**mean[0].release, "noisy_count": 1, "noisy_sum": 900.0})])
    assert clamped.value == 100
    empty = combine_parts([_p("a", {**mean[0].release, "noisy_count": 0})])
    assert empty.value == 50

    skey = json.dumps({"op": "sum", "field": "age"})
    total = combine_parts(
        [
            _p(h, {"op": "sum", "field": "age", "query_key": skey, "noisy_sum": v, "sum_sd": 1.0})
            for h, v in (("a", 5.0), ("b", -2.0))
        ]
    )
    assert total.value == 3.0

    hkey = json.dumps({"op": "histogram", "field": "diagnosis"})
    hist = combine_parts(
        [
            _p(
                h,
                {
                    "op": "histogram",
                    "field": "diagnosis",
                    "query_key": hkey,
                    "histogram": hs,
                    "count_sd": 2.0,
                    "top": 1,
                },
            )
            for h, hs in (("a", [["E11", 3], ["I10", 5]]), ("b", [["E11", 4], ["I10", 1]]))
        ]
    )
    assert dict(map(tuple, hist.release["histogram"])) == {"E11": 7, "I10": 6}
    assert "E11 ≈ 7" in hist.text and "I10" not in hist.text


def test_combine_refuses_mismatched_or_malformed_parts() -> None:
    a = {"op": "count", "query_key": COUNT_KEY, "noisy_count": 3, "count_sd": 1.0}
    other = {**a, "query_key": json.dumps({"op": "count"})}
    with pytest.raises(ValueError, match="different queries"):
        combine_parts([_p("a", a), _p("b", other)])
    with pytest.raises(ValueError, match="deltas"):
        combine_parts([_p("a", a), _p("b", a, delta=1e-6)])
    with pytest.raises(ValueError, match="noisy count"):
        combine_parts([_p("a", {**a, "noisy_count": None})])
    with pytest.raises(ValueError, match="aggregate_json"):
        parse_part(
            {"node_id": "a", "rdp_orders": [2.0], "rdp_epsilons": [0.1], "aggregate_json": "{"}
        )


def test_uncombinable_parts_fail_with_their_curve() -> None:
    d = make("a", "b")
    req = agg("r10", ("a", "b"))
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    d.on_node_result(part(req, "a", share=0.5), now_ms=1)
    bad = part(req, "b", share=0.5, release={"op": "count", "query_key": "x", "noisy_count": 1})
    (send,) = sends(d.on_node_result(bad, now_ms=2))
    assert send.record["status"] == "failed" and "cannot combine" in send.record["reason"]
    assert send.record["rdp_orders"]

"""The node-results protocol as the router speaks it (pure): every record it writes says what it
is (`kind`), it reads kinds rather than status/node_id, and the accountant's reserved ρ travels
on every RoutedRequest (single attempts, hedges, fan-out parts, and after a restart)."""

from __future__ import annotations

from typing import Any

from fedllm.common import codec, topics
from fedllm.common.results import result_kind
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.services.router import recovery
from fedllm.services.router.dispatcher import Dispatcher, Send
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import decision, heartbeat, node_result, request
from tests.router.test_fanout import agg, part

RHO = 0.0123


def make(*hospitals: str) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5.0), strategy=DepartmentLeastLoad(), node_timeout_s=1.0
    )
    for h in hospitals:
        d.on_heartbeat(heartbeat(h, sent_at_ms=0), now_ms=0)
    return d


def results_of(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.record for a in actions if isinstance(a, Send) and a.topic == topics.NODE_RESULTS]


def routed_of(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.record for a in actions if isinstance(a, Send) and a.schema == "RoutedRequest"]


def test_reserved_rho_travels_on_every_routed_request() -> None:
    d = make("a", "b")
    req = request("r1", created_ms=0, deadline_ms=10_000)
    (first,) = routed_of(d.on_decision(dict(decision(req, at_ms=0), reserved_rho=RHO), now_ms=0))
    assert first["reserved_rho"] == RHO
    codec.encode("RoutedRequest", first)
    failed = node_result(req, status="failed", node_id=first["hospital_id"], attempt=1, at_ms=5)
    (retry,) = routed_of(d.on_node_result(dict(failed, kind="answer"), now_ms=5))
    assert retry["attempt"] == 2 and retry["reserved_rho"] == RHO

    fan = agg("r2", ("a", "b"))
    parts = routed_of(d.on_decision(dict(decision(fan, at_ms=0), reserved_rho=RHO), now_ms=0))
    assert [p["reserved_rho"] for p in parts] == [RHO, RHO]
    assert [p["budget_share"] for p in parts] == [0.5, 0.5]

    # A decision from an accountant that predates the field: 0, the node derives ρ itself.
    legacy = request("r3", created_ms=0, deadline_ms=10_000)
    (sent,) = routed_of(d.on_decision(decision(legacy, at_ms=0), now_ms=0))
    assert sent["reserved_rho"] == 0.0


def test_restart_restores_the_reserved_rho() -> None:
    live = make("a", "b")
    req = request("r1", created_ms=0, deadline_ms=10_000)
    fan = agg("r2", ("a", "b"))
    sent = routed_of(live.on_decision(dict(decision(req, at_ms=0), reserved_rho=RHO), now_ms=0))
    sent += routed_of(live.on_decision(dict(decision(fan, at_ms=0), reserved_rho=RHO), now_ms=0))
    fresh = make("a", "b")
    assert recovery.restore(fresh, sent, now_ms=10) == 2
    assert fresh.in_flight["r1"].reserved_rho == RHO
    assert fresh.fan_outs["r2"].reserved_rho == RHO
    failed = node_result(req, status="failed", node_id=sent[0]["hospital_id"], attempt=1, at_ms=11)
    (retry,) = routed_of(fresh.on_node_result(dict(failed, kind="answer"), now_ms=11))
    assert retry["reserved_rho"] == RHO


def test_router_records_say_what_they_are() -> None:
    d = make("a", "b")
    req = request("r1", hospitals=("a",), created_ms=0, deadline_ms=10_000)
    d.on_decision(decision(req, at_ms=0), now_ms=0)
    failed = dict(node_result(req, status="failed", node_id="a", attempt=1, at_ms=5), kind="answer")
    (verdict,) = results_of(d.on_node_result(failed, now_ms=5))  # no other node named
    assert verdict["kind"] == "verdict" and result_kind(verdict) == "verdict"
    codec.encode("InferenceResult", verdict)

    fan = agg("r2", ("a", "b"))
    d.on_decision(decision(fan, at_ms=0), now_ms=0)
    d.on_node_result(dict(part(fan, "a", share=0.5), kind="part"), now_ms=5)
    pb = dict(part(fan, "b", share=0.5), kind="part")
    (combined,) = results_of(d.on_node_result(pb, now_ms=6))
    assert combined["kind"] == "combined" and combined["status"] == "ok"
    codec.encode("InferenceResult", combined)


def test_a_failed_part_that_spent_goes_into_the_verdict_with_the_answered_parts() -> None:
    d = make("a", "b", "c")
    fan = agg("r1", ("a", "b", "c"))
    d.on_decision(decision(fan, at_ms=0), now_ms=0)
    pa = dict(part(fan, "a", share=1 / 3), kind="part")
    pb = dict(part(fan, "b", share=1 / 3, status="failed"), kind="part")  # spent, then failed
    d.on_node_result(pa, now_ms=5)
    (verdict,) = results_of(d.on_node_result(pb, now_ms=6))
    assert verdict["kind"] == "verdict" and verdict["status"] == "failed"
    both = PrivacyCurve(pa["rdp_orders"], pa["rdp_epsilons"]) + PrivacyCurve(
        pb["rdp_orders"], pb["rdp_epsilons"]
    )
    assert verdict["rdp_epsilons"] == list(both.values)
    assert "a,b spent on their parts" in verdict["reason"]

    # A part that failed before its mechanism ran (no curve) adds nothing.
    fan = agg("r2", ("a", "b"))
    d.on_decision(decision(fan, at_ms=0), now_ms=0)
    nothing = dict(part(fan, "a", share=0.5, status="failed"), kind="part", rdp_orders=[])
    (verdict,) = results_of(d.on_node_result(nothing, now_ms=6))
    assert "rdp_orders" not in verdict


def test_a_verdict_read_back_ends_the_request_whatever_its_node_id() -> None:
    """The kind, not node_id "", says it is the router's: another replica's verdict naming the
    hospital it gave up on closes the request here too, with nothing sent (no retry)."""
    d = make("a", "b")
    req = request("r1", created_ms=0, deadline_ms=10_000)
    (sent,) = routed_of(d.on_decision(decision(req, at_ms=0), now_ms=0))
    verdict = dict(
        node_result(req, status="failed", node_id=sent["hospital_id"], attempt=1, at_ms=5),
        kind="verdict",
    )
    assert d.on_node_result(verdict, now_ms=5) == []
    assert d.is_finished("r1") and d.in_flight == {}


def test_the_accountants_final_result_is_not_an_answer() -> None:
    d = make("a", "b")
    req = request("r1", created_ms=0, deadline_ms=10_000)
    (sent,) = routed_of(d.on_decision(decision(req, at_ms=0), now_ms=0))
    final = dict(
        node_result(req, status="failed", node_id=sent["hospital_id"], attempt=1, at_ms=5),
        kind="final",
    )
    assert d.on_node_result(final, now_ms=5) == []  # not retried: not a node's answer
    assert "r1" in d.in_flight

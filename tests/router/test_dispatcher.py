"""Dispatcher: routing, idempotency, retry once, failure results (pure, time passed in)."""

from __future__ import annotations

from fedllm.common import topics
from fedllm.services.router.dispatcher import Action, Audit, Dispatcher, Send
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import decision, heartbeat, node_result, request


def make(node_timeout_s: float = 1.0, ttl_s: float = 5.0) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=ttl_s),
        strategy=DepartmentLeastLoad(),
        node_timeout_s=node_timeout_s,
    )
    d.on_heartbeat(heartbeat("a", departments=("cardiology",), sent_at_ms=0), now_ms=0)
    d.on_heartbeat(
        heartbeat("b", departments=("cardiology",), queue_depth=1, sent_at_ms=0), now_ms=0
    )
    return d


def sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def audits(actions: list[Action]) -> list[str]:
    return [a.action for a in actions if isinstance(a, Audit)]


REQ = request("r1", department="cardiology", created_ms=0, deadline_ms=10_000)


def test_routes_to_least_loaded_matching_node_with_capped_deadline() -> None:
    d = make(node_timeout_s=60)
    actions = d.on_decision(decision(REQ, at_ms=100), now_ms=100)
    (send,) = sends(actions)
    assert send.topic == topics.hospital_requests("a")
    assert send.record["attempt"] == 1
    assert send.record["deadline_ms"] == 10_000  # min(now + 60 s, request deadline)
    assert send.key == "r1"
    assert audits(actions) == ["request.routed"]


def test_replayed_and_rejected_decisions_are_ignored() -> None:
    d = make()
    assert sends(d.on_decision(decision(REQ, at_ms=0), now_ms=0))
    assert d.on_decision(decision(REQ, at_ms=0), now_ms=5) == []
    d.on_node_result(node_result(REQ, status="ok", node_id="a", attempt=1, at_ms=6), now_ms=6)
    assert d.in_flight == {} and d.is_finished("r1")
    assert d.on_decision(decision(REQ, at_ms=0), now_ms=7) == []
    other = request("r2", created_ms=0, deadline_ms=10_000)
    assert d.on_decision(decision(other, approved=False, at_ms=0), now_ms=8) == []


def test_silent_node_is_retried_once_elsewhere_then_fails() -> None:
    d = make(node_timeout_s=1)
    d.on_decision(decision(REQ, at_ms=0), now_ms=0)
    assert d.tick(now_ms=999) == []
    retry = d.tick(now_ms=1000)
    (send,) = sends(retry)
    assert send.topic == topics.hospital_requests("b") and send.record["attempt"] == 2
    assert audits(retry) == ["request.retried", "request.routed"]
    # attempt 1's late failure is stale; attempt 2's failure ends it
    assert (
        d.on_node_result(
            node_result(REQ, status="failed", node_id="a", attempt=1, at_ms=1100), now_ms=1100
        )
        == []
    )
    fail = d.on_node_result(
        node_result(REQ, status="failed", node_id="b", attempt=2, at_ms=1200), now_ms=1200
    )
    (result,) = sends(fail)
    assert result.topic == topics.NODE_RESULTS and result.key == "u1"
    assert result.record["status"] == "failed" and result.record["attempt"] == 2
    assert audits(fail) == ["request.route_failed"]
    assert d.in_flight == {}


def test_failed_answer_triggers_retry_and_late_ok_still_closes() -> None:
    d = make()
    d.on_decision(decision(REQ, at_ms=0), now_ms=0)
    retry = d.on_node_result(
        node_result(REQ, status="failed", node_id="a", attempt=1, at_ms=10), now_ms=10
    )
    assert sends(retry)[0].record["hospital_id"] == "b"
    assert (
        d.on_node_result(node_result(REQ, status="ok", node_id="b", attempt=2, at_ms=20), now_ms=20)
        == []
    )
    assert d.in_flight == {}


def test_failure_after_a_mechanism_started_ends_the_request_without_retry() -> None:
    """A failed result carrying a spent curve was charged by the accountant (settled failed):
    retrying it would spend again, so the router just finishes it."""
    d = make()
    d.on_decision(decision(REQ, at_ms=0), now_ms=0)
    spent = dict(
        node_result(REQ, status="failed", node_id="a", attempt=1, at_ms=10),
        rdp_orders=[2.0, 4.0],
        rdp_epsilons=[0.002, 0.004],
    )
    assert d.on_node_result(spent, now_ms=10) == []
    assert d.in_flight == {} and d.is_finished("r1")
    assert sends(d.tick(now_ms=4_000)) == []  # no retry, no route failure later either


def test_node_leaving_reroutes_what_it_held() -> None:
    d = make(node_timeout_s=60, ttl_s=5)
    d.on_decision(decision(REQ, at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("b", departments=("cardiology",), sent_at_ms=4000), now_ms=4000)
    actions = d.tick(now_ms=5000)
    assert audits(actions) == ["node.left", "request.retried", "request.routed"]
    assert sends(actions)[0].record["hospital_id"] == "b"


def test_deadline_passed_gives_timeout_and_no_node_gives_failed() -> None:
    d = make(node_timeout_s=60)
    late = request("r3", department="cardiology", created_ms=0, deadline_ms=500)
    d.on_decision(decision(late, at_ms=0), now_ms=0)
    (res,) = sends(d.tick(now_ms=500))
    assert res.record["status"] == "timeout"

    nowhere = request("r4", hospitals=("zzz",), created_ms=0, deadline_ms=10_000)
    (res,) = sends(d.on_decision(decision(nowhere, at_ms=0), now_ms=0))
    assert res.record["status"] == "failed" and "no eligible node among zzz" in res.record["reason"]
    assert d.is_finished("r4")


def test_burst_spreads_across_equal_nodes() -> None:
    d = make()
    d.on_heartbeat(heartbeat("b", departments=("cardiology",), sent_at_ms=1), now_ms=1)
    targets = [
        sends(
            d.on_decision(
                decision(
                    request(f"q{i}", department="cardiology", created_ms=0, deadline_ms=10_000),
                    at_ms=2,
                ),
                now_ms=2,
            )
        )[0].record["hospital_id"]
        for i in range(4)
    ]
    assert sorted(targets) == ["a", "a", "b", "b"]


def test_finished_memory_is_bounded() -> None:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5),
        strategy=DepartmentLeastLoad(),
        node_timeout_s=1,
        finished_memory=2,
    )
    for i in range(3):
        d.on_decision(decision(request(f"x{i}", created_ms=0, deadline_ms=10), at_ms=0), now_ms=0)
    assert not d.is_finished("x0") and d.is_finished("x1") and d.is_finished("x2")


def test_send_failure_abandons_the_attempt() -> None:
    d = make()
    d.on_decision(decision(REQ, at_ms=0), now_ms=0)
    assert d.on_send_failed("r1", "b", now_ms=1) == []  # not the current attempt
    retry = d.on_send_failed("r1", "a", now_ms=1)
    assert sends(retry)[0].record["hospital_id"] == "b"
    assert "could not send to a" in [a for a in retry if isinstance(a, Audit)][0].fields["reason"]


def test_a_batch_routes_high_priority_first_onto_the_best_node() -> None:
    d = make(node_timeout_s=60)
    batch = [
        decision(
            request(rid, department="cardiology", created_ms=0, deadline_ms=10_000, priority=p),
            at_ms=1,
        )
        for rid, p in (("lo", "low"), ("no", "normal"), ("hi", "high"))
    ]
    sent = sends(d.on_decisions(batch, now_ms=1))
    assert [s.record["request_id"] for s in sent] == ["hi", "no", "lo"]
    assert sent[0].record["hospital_id"] == "a"  # the idle node goes to the high request

"""Dispatcher with the new strategies: batched placement, hedging and its charge, audited
candidate sets, node health from heartbeats, and the metrics read from the audit actions."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from fedllm.common import topics
from fedllm.services.router.assignment import BatchAssignment
from fedllm.services.router.dispatcher import HEDGE_MIN_SAMPLES, Action, Audit, Dispatcher, Send
from fedllm.services.router.metrics import RouterMetrics
from fedllm.services.router.privacy_aware import PrivacyAware
from fedllm.services.router.registry import NodeRegistry
from fedllm.services.router.response_time import WeightedResponseTime
from tests.router.helpers import decision, heartbeat, node_result, request


def sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def audits(actions: list[Action], name: str) -> list[Audit]:
    return [a for a in actions if isinstance(a, Audit) and a.action == name]


def ok(req: dict, node: str, attempt: int, at: int) -> dict:
    return node_result(req, status="ok", node_id=node, attempt=attempt, at_ms=at)


def test_heartbeat_health_fields_reach_the_registry_with_defaults_for_old_nodes() -> None:
    reg = NodeRegistry(ttl_s=5)
    beat = heartbeat("new", sent_at_ms=0, ewma_latency_ms=120.0, error_rate=0.2, budget_room=3)
    beat["queue_by_priority"] = {"high": 1, "normal": 2}
    reg.observe(beat, now_ms=0)
    old = heartbeat("old", latency_ms=40.0, sent_at_ms=0)
    for key in ("ewma_latency_ms", "error_rate", "budget_room"):
        del old[key]
    reg.observe(old, now_ms=0)
    new_node, old_node = reg.get("new", now_ms=0), reg.get("old", now_ms=0)
    assert new_node is not None and old_node is not None
    assert new_node.latency_ms == 120.0 and new_node.error_rate == 0.2
    assert new_node.budget_room == 3 and new_node.queue_by_priority == (("high", 1), ("normal", 2))
    assert old_node.latency_ms == 40.0 and old_node.budget_room == -1 and old_node.eligible


def test_routed_epsilon_is_counted_per_hospital_and_survives_heartbeats() -> None:
    reg = NodeRegistry(ttl_s=5)
    reg.observe(heartbeat("a", sent_at_ms=0), now_ms=0)
    reg.note_routed("a", epsilon=1.5)
    reg.note_routed("a", epsilon=0.5)
    reg.observe(heartbeat("a", sent_at_ms=100), now_ms=100)
    node = reg.get("a", now_ms=100)
    assert node is not None and node.routed_epsilon == 2.0 and node.routed_since_heartbeat == 0


def test_a_node_reporting_failures_leaves_the_candidate_set_and_comes_back() -> None:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=5), strategy=WeightedResponseTime(), node_timeout_s=10
    )
    d.on_heartbeat(heartbeat("a", sent_at_ms=0, error_rate=0.8), now_ms=0)
    req = request("r1", created_ms=0, deadline_ms=60_000)
    (failed,) = sends(d.on_decision(decision(req, at_ms=0), now_ms=0))
    assert failed.topic == topics.NODE_RESULTS and "no eligible node" in failed.record["reason"]
    d.on_heartbeat(heartbeat("a", sent_at_ms=1000, error_rate=0.1), now_ms=1000)
    req2 = request("r2", created_ms=1000, deadline_ms=60_000)
    (routed,) = sends(d.on_decision(decision(req2, at_ms=1000), now_ms=1000))
    assert routed.topic == topics.hospital_requests("a")


def test_routed_audit_names_the_strategy_and_the_candidate_set() -> None:
    d = Dispatcher(registry=NodeRegistry(ttl_s=5), strategy=PrivacyAware(), node_timeout_s=10)
    for h, deps in (("a", ("cardiology",)), ("b", ("cardiology",)), ("c", ("general",))):
        d.on_heartbeat(heartbeat(h, departments=deps, sent_at_ms=0), now_ms=0)
    req = request("r1", department="cardiology", created_ms=0, deadline_ms=60_000)
    (audit,) = audits(d.on_decision(decision(req, at_ms=0), now_ms=0), "request.routed")
    assert audit.fields["strategy"] == "privacy_aware"
    assert audit.fields["candidates"] == "a,b"
    assert audit.fields["hospital_id"] in ("a", "b")


def test_a_batch_strategy_places_a_window_of_decisions_jointly() -> None:
    d = Dispatcher(registry=NodeRegistry(ttl_s=5), strategy=BatchAssignment(), node_timeout_s=10)
    d.on_heartbeat(heartbeat("fast", sent_at_ms=0, ewma_latency_ms=100), now_ms=0)
    d.on_heartbeat(heartbeat("slower", sent_at_ms=0, ewma_latency_ms=150), now_ms=0)
    normal = request("n", created_ms=0, deadline_ms=60_000)
    high = request("h", created_ms=0, deadline_ms=60_000, priority="high")
    actions = d.on_decisions(
        [decision(normal, at_ms=0), decision(high, at_ms=0), decision(normal, at_ms=0)], now_ms=0
    )  # a duplicate in the window
    placed = {s.record["request_id"]: s.record["hospital_id"] for s in sends(actions)}
    assert placed == {"h": "fast", "n": "slower"}
    assert len(sends(actions)) == 2
    assert {a.fields["candidates"] for a in audits(actions, "request.routed")} == {"fast,slower"}
    # replays of a routed window change nothing
    assert d.on_decisions([decision(normal, at_ms=1), decision(high, at_ms=1)], now_ms=1) == []


def hedging_dispatcher(*, hedge: bool) -> Dispatcher:
    d = Dispatcher(
        registry=NodeRegistry(ttl_s=60),
        strategy=WeightedResponseTime(),
        node_timeout_s=30,
        hedge=hedge,
    )
    d.on_heartbeat(heartbeat("a", sent_at_ms=0, ewma_latency_ms=100), now_ms=0)
    d.on_heartbeat(heartbeat("b", sent_at_ms=0, ewma_latency_ms=200), now_ms=0)
    for i in range(HEDGE_MIN_SAMPLES):  # answer times 100 … 119 ms: p95 = 119
        warm = request(f"w{i}", created_ms=0, deadline_ms=60_000)
        (send,) = sends(d.on_decision(decision(warm, at_ms=0), now_ms=0))
        d.on_node_result(ok(warm, send.record["hospital_id"], 1, 100 + i), now_ms=100 + i)
    return d


def test_hedging_is_off_by_default() -> None:
    d = hedging_dispatcher(hedge=False)
    req = request("h1", created_ms=1000, deadline_ms=60_000, priority="high")
    d.on_decision(decision(req, at_ms=1000), now_ms=1000)
    assert sends(d.tick(now_ms=5000)) == []


def test_a_slow_high_priority_attempt_is_hedged_once_and_charged_as_a_second_reservation() -> None:
    d = hedging_dispatcher(hedge=True)
    assert d.hedge_after_ms() == 119
    high = request("h1", created_ms=1000, deadline_ms=60_000, priority="high")
    normal = request("n1", created_ms=1000, deadline_ms=60_000)
    (first,) = sends(d.on_decision(decision(high, at_ms=1000), now_ms=1000))
    d.on_decision(decision(normal, at_ms=1000), now_ms=1000)
    assert sends(d.tick(now_ms=1100)) == []  # before the p95
    actions = d.tick(now_ms=1119)
    (hedge,) = sends(actions)  # the normal-priority request is not hedged
    assert hedge.record["request_id"] == "h1" and hedge.record["attempt"] == 2
    assert hedge.record["hospital_id"] != first.record["hospital_id"]
    (audit,) = audits(actions, "request.hedged")
    assert (
        audit.fields["epsilon"] == high["epsilon"]
        and "second reservation" in audit.fields["reason"]
    )
    assert audit.fields["strategy"] == "response_time"
    assert sends(d.tick(now_ms=3000)) == []  # hedged once
    # the hedge answers first: closed; the first attempt's later answer changes nothing
    assert d.on_node_result(ok(high, hedge.record["hospital_id"], 2, 3100), now_ms=3100) == []
    assert d.is_finished("h1")
    assert d.on_node_result(ok(high, first.record["hospital_id"], 1, 3200), now_ms=3200) == []


def test_when_one_side_of_a_hedge_fails_the_other_carries_on_without_a_retry() -> None:
    d = hedging_dispatcher(hedge=True)
    high = request("h1", created_ms=1000, deadline_ms=60_000, priority="high")
    (first,) = sends(d.on_decision(decision(high, at_ms=1000), now_ms=1000))
    (hedge,) = sends(d.tick(now_ms=1200))
    a, b = first.record["hospital_id"], hedge.record["hospital_id"]
    failed = node_result(high, status="failed", node_id=a, attempt=1, at_ms=1300)
    assert d.on_node_result(failed, now_ms=1300) == []  # no retry, no failure: b still runs
    entry = d.in_flight["h1"]
    assert (entry.hospital_id, entry.attempt, entry.hedge_hospital_id) == (b, 2, "")
    # b now fails too: attempts are spent, so the request fails
    failed_b = node_result(high, status="failed", node_id=b, attempt=2, at_ms=1400)
    (verdict,) = sends(d.on_node_result(failed_b, now_ms=1400))
    assert verdict.topic == topics.NODE_RESULTS and verdict.record["status"] == "failed"


def test_metrics_count_decisions_per_strategy_and_bounded_hospital_label() -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(hospitals=["a", "b"], registry=registry)
    d = Dispatcher(registry=NodeRegistry(ttl_s=5), strategy=PrivacyAware(), node_timeout_s=1)
    d.on_heartbeat(heartbeat("a", sent_at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("zz", sent_at_ms=0, queue_depth=9), now_ms=0)
    actions = d.on_decision(
        decision(request("r1", created_ms=0, deadline_ms=60_000), at_ms=0), now_ms=0
    )
    actions += d.tick(now_ms=1000)  # a misses the deadline: retried on zz (not configured)
    actions += d.tick(now_ms=2000)  # and zz too: failed
    for action in actions:
        if isinstance(action, Audit):
            metrics.observe(action, strategy=d.strategy.name)

    def value(hospital: str, outcome: str) -> float | None:
        return registry.get_sample_value(
            "fedllm_router_decisions_total",
            {"strategy": "privacy_aware", "hospital": hospital, "outcome": outcome},
        )

    assert value("a", "routed") == 1.0
    assert value("other", "routed") == 1.0 and value("other", "retried") == 1.0
    assert value("other", "failed") == 1.0
    assert value("zz", "routed") is None  # never a label outside the configuration
    assert (
        registry.get_sample_value("fedllm_router_candidates_count", {"strategy": "privacy_aware"})
        == 2.0
    )

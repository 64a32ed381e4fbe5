"""Node admission and circuit breakers in the router (pure; time passed in)."""

from __future__ import annotations

import json

import pytest

from fedllm.common.control import STRATEGY_NAMES, ControlState, validate_config
from fedllm.services.router.admission import ControlledRegistry
from fedllm.services.router.dispatcher import Dispatcher, Send
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.strategies import STRATEGIES
from tests.router.helpers import decision, heartbeat, request


def cmd(action: str, target: str = "", value: object = None, reason: str = "") -> dict:
    return {
        "command_id": f"{action}-{target}",
        "action": action,
        "target": target,
        "value": "" if value is None else json.dumps(value),
        "reason": reason,
        "actor_user_id": "adm",
        "actor_role": "admin",
        "issued_at_ms": 0,
    }


def make(*configured: str) -> tuple[ControlState, ControlledRegistry, Dispatcher]:
    state = ControlState(configured=frozenset(configured))
    registry = ControlledRegistry(ttl_s=5.0, control=state)
    d = Dispatcher(registry=registry, strategy=DepartmentLeastLoad(), node_timeout_s=10)
    return state, registry, d


def route(d: Dispatcher, rid: str, now: int) -> list[Send]:
    req = request(rid, created_ms=now, deadline_ms=now + 60_000)
    return [a for a in d.on_decision(decision(req, at_ms=now), now_ms=now) if isinstance(a, Send)]


def test_strategy_names_match_the_router() -> None:
    assert set(STRATEGY_NAMES) == set(STRATEGIES)


def test_unapproved_heartbeat_is_ignored_and_reported_once() -> None:
    state, registry, d = make("a")
    d.on_heartbeat(heartbeat("a", sent_at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("rogue", sent_at_ms=0), now_ms=0)
    d.on_heartbeat(heartbeat("rogue", sent_at_ms=1), now_ms=1)
    assert [n.hospital_id for n in registry.alive(1)] == ["a"]
    events = registry.drain_events()
    assert [(e.action, e.hospital_id) for e in events] == [("node.heartbeat_ignored", "rogue")]
    assert "unknown" in events[0].fields["reason"]
    # Registered is not enough; approved is.
    state.apply(cmd("node_register", "rogue", ["general"]))
    d.on_heartbeat(heartbeat("rogue", sent_at_ms=2), now_ms=2)
    assert "rogue" not in [n.hospital_id for n in registry.alive(2)]
    state.apply(cmd("node_approve", "rogue"))
    d.on_heartbeat(heartbeat("rogue", sent_at_ms=3), now_ms=3)
    assert "rogue" in [n.hospital_id for n in registry.alive(3)]


def test_manual_breaker_keeps_work_away_until_closed() -> None:
    state, registry, d = make("a", "b")
    for h in ("a", "b"):
        d.on_heartbeat(heartbeat(h, sent_at_ms=0, queue_depth=0 if h == "a" else 3), now_ms=0)
    assert route(d, "r0", 1)[0].record["hospital_id"] == "a"
    state.apply(cmd("breaker_open", "a", reason="bad answers"))
    assert registry.blocked("a") == "breaker open: bad answers"
    assert route(d, "r1", 2)[0].record["hospital_id"] == "b"
    state.apply(cmd("breaker_open", "b"))
    (failed,) = route(d, "r2", 3)  # both open: the request fails (refunded), not queued
    assert failed.schema == "InferenceResult" and failed.record["status"] == "failed"
    state.apply(cmd("breaker_close", "a"))
    assert route(d, "r3", 4)[0].record["hospital_id"] == "a"


def test_nothing_routed_while_any_candidate_is_blocked_fails_cleanly() -> None:
    state, _, d = make("a")
    d.on_heartbeat(heartbeat("a", sent_at_ms=0), now_ms=0)
    state.apply(cmd("halt", reason="incident 42"))
    req = request("rh", created_ms=1, deadline_ms=60_000)
    (sent,) = [a for a in d.on_decision(decision(req, at_ms=1), now_ms=1) if isinstance(a, Send)]
    assert sent.schema == "InferenceResult" and sent.record["status"] == "failed"
    assert not sent.record.get("rdp_orders")  # nothing started: the accountant refunds
    state.apply(cmd("resume"))
    assert route(d, "rh2", 2)[0].record["hospital_id"] == "a"


@pytest.mark.parametrize(
    ("beat", "why"),
    [({"error_rate": 0.6}, "error rate"), ({"ewma_latency_ms": 9_000.0}, "latency")],
)
def test_automatic_breaker_opens_and_closes_after_cooldown(beat: dict, why: str) -> None:
    state, registry, d = make("a")
    state.apply(cmd("config_set", "breaker_latency_ms", 5_000))
    state.apply(cmd("config_set", "breaker_cooldown_s", 10))
    d.on_heartbeat(heartbeat("a", sent_at_ms=0, **beat), now_ms=0)
    (opened,) = registry.drain_events()
    assert opened.action == "node.breaker_opened" and why in opened.fields["reason"]
    assert why in registry.blocked("a")
    d.on_heartbeat(heartbeat("a", sent_at_ms=5_000), now_ms=5_000)  # healthy, within cooldown
    assert registry.blocked("a") and registry.drain_events() == []
    d.on_heartbeat(heartbeat("a", sent_at_ms=10_000), now_ms=10_000)
    (closed,) = registry.drain_events()
    assert closed.action == "node.breaker_closed" and registry.blocked("a") == ""


def test_draining_takes_no_new_work_and_removed_leaves_now() -> None:
    state, registry, d = make("a", "b")
    for h in ("a", "b"):
        d.on_heartbeat(heartbeat(h, sent_at_ms=0), now_ms=0)
    state.apply(cmd("node_drain", "a"))
    d.on_heartbeat(heartbeat("a", sent_at_ms=1), now_ms=1)  # a draining node still reports
    assert {s.record["hospital_id"] for s in route(d, "d1", 2)} == {"b"}
    state.apply(cmd("node_remove", "a"))
    left = [a for a in d.tick(now_ms=3) if getattr(a, "action", "") == "node.left"]
    assert [a.fields["hospital_id"] for a in left] == ["a"]
    d.on_heartbeat(heartbeat("a", sent_at_ms=4), now_ms=4)
    assert [n.hospital_id for n in registry.alive(4)] == ["b"]


def test_config_validation_refuses_bad_values() -> None:
    assert validate_config("router_strategy", "round_robin") == "round_robin"
    for key, value in [
        ("router_strategy", "fastest"),
        ("cache_enabled", "yes"),
        ("breaker_error_rate", 0),
        ("breaker_latency_ms", -1),
        ("nope", 1),
    ]:
        with pytest.raises(ValueError):
            validate_config(key, value)


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []

    async def send(self, topic: str, schema: str, record: dict, key=None) -> None:
        self.sent.append((topic, schema, record))


async def test_router_fails_decisions_while_halted(tmp_path) -> None:
    from fedllm.common import topics
    from fedllm.common.config import Settings
    from fedllm.services.router.service import RouterService

    router = RouterService(Settings(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path))
    bus = RecordingBus()
    router.bus = bus  # type: ignore[assignment]
    router.control.apply(cmd("halt", reason="incident 7"))
    req = request("rq-halt", created_ms=0, deadline_ms=10**13)
    await router.route_batch([(None, decision(req, at_ms=0))])  # type: ignore[list-item]
    ((topic, schema, record),) = bus.sent
    assert (topic, schema) == (topics.NODE_RESULTS, "InferenceResult")
    assert record["status"] == "failed" and record["reason"] == "processing halted: incident 7"
    assert not record.get("rdp_orders")  # nothing started: the accountant refunds
    assert router.dispatcher.in_flight == {}  # nothing routed
    await router.stop()

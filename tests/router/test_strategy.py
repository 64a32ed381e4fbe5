"""DepartmentLeastLoad: department match first, then least load, then latency."""

from __future__ import annotations

from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.registry import NodeInfo, NodeRegistry
from fedllm.services.router.strategy import RoutingStrategy
from tests.router.helpers import heartbeat, request


def nodes(*beats: dict) -> list[NodeInfo]:
    reg = NodeRegistry(ttl_s=5)
    for hb in beats:
        reg.observe(hb, now_ms=0)
    return reg.alive(0)


REQ = request("r1", department="cardiology", created_ms=0, deadline_ms=10_000)
STRATEGY: RoutingStrategy = DepartmentLeastLoad()


def test_department_match_beats_lower_load() -> None:
    pool = nodes(
        heartbeat("idle_general", departments=("general",), sent_at_ms=0),
        heartbeat("busy_cardio", departments=("cardiology",), queue_depth=5, sent_at_ms=0),
    )
    choice = STRATEGY.choose(REQ, pool)
    assert choice is not None and choice.node.hospital_id == "busy_cardio"
    assert "serves cardiology" in choice.reason


def test_least_load_among_matching_then_latency() -> None:
    pool = nodes(
        heartbeat("a", departments=("cardiology",), queue_depth=2, in_flight=1, sent_at_ms=0),
        heartbeat(
            "b",
            departments=("cardiology",),
            queue_depth=0,
            in_flight=2,
            latency_ms=50,
            sent_at_ms=0,
        ),
        heartbeat(
            "c",
            departments=("cardiology",),
            queue_depth=1,
            in_flight=1,
            latency_ms=20,
            sent_at_ms=0,
        ),
    )
    choice = STRATEGY.choose(REQ, pool)
    assert choice is not None and choice.node.hospital_id == "c"


def test_excluded_unhealthy_and_unnamed_nodes_are_not_eligible() -> None:
    pool = nodes(
        heartbeat("a", departments=("cardiology",), sent_at_ms=0),
        heartbeat("b", departments=("cardiology",), healthy=False, sent_at_ms=0),
        heartbeat("c", departments=("general",), queue_depth=9, sent_at_ms=0),
        heartbeat("d", departments=("cardiology",), sent_at_ms=0),
    )
    assert STRATEGY.choose(REQ, pool, exclude={"a"}).node.hospital_id == "d"  # type: ignore[union-attr]
    named = request(
        "r2", department="cardiology", hospitals=("b", "c"), created_ms=0, deadline_ms=1
    )
    choice = STRATEGY.choose(named, pool)
    assert choice is not None and choice.node.hospital_id == "c"
    assert "no eligible node serves cardiology" in choice.reason
    assert STRATEGY.choose(named, pool, exclude={"c"}) is None


def test_falls_back_to_least_loaded_when_no_node_serves_department() -> None:
    pool = nodes(
        heartbeat("a", departments=("general",), queue_depth=3, sent_at_ms=0),
        heartbeat("b", departments=("radiology",), queue_depth=1, sent_at_ms=0),
    )
    choice = STRATEGY.choose(REQ, pool)
    assert choice is not None and choice.node.hospital_id == "b"
    assert "no eligible node serves cardiology" in choice.reason


def test_nothing_eligible() -> None:
    assert STRATEGY.choose(REQ, []) is None

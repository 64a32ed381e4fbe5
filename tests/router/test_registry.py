"""NodeRegistry: liveness by TTL, joins, departures, replayed history."""

from __future__ import annotations

import pytest

from fedllm.services.router.registry import NodeRegistry
from tests.router.helpers import heartbeat


def test_first_heartbeat_joins_and_repeat_does_not() -> None:
    reg = NodeRegistry(ttl_s=5)
    assert reg.observe(heartbeat("a", sent_at_ms=1000), now_ms=1000) is True
    assert reg.observe(heartbeat("a", queue_depth=3, sent_at_ms=2000), now_ms=2000) is False
    (node,) = reg.alive(2000)
    assert node.queue_depth == 3 and node.last_seen_ms == 2000


def test_alive_drops_silent_nodes_and_expire_reports_them_once() -> None:
    reg = NodeRegistry(ttl_s=5)
    reg.observe(heartbeat("a", sent_at_ms=0), now_ms=0)
    reg.observe(heartbeat("b", sent_at_ms=3000), now_ms=3000)
    assert [n.hospital_id for n in reg.alive(4999)] == ["a", "b"]
    assert [n.hospital_id for n in reg.alive(5000)] == ["b"]
    assert reg.get("a", now_ms=5000) is None
    assert [n.hospital_id for n in reg.expire(now_ms=5000)] == ["a"]
    assert reg.expire(now_ms=5000) == []
    # a node that comes back joins again
    assert reg.observe(heartbeat("a", sent_at_ms=6000), now_ms=6000) is True


def test_heartbeat_older_than_ttl_is_history_not_liveness() -> None:
    reg = NodeRegistry(ttl_s=5)
    assert reg.observe(heartbeat("a", sent_at_ms=1000), now_ms=7000) is False
    assert reg.alive(7000) == []


def test_routed_since_heartbeat_adds_to_load_until_next_heartbeat() -> None:
    reg = NodeRegistry(ttl_s=5)
    reg.observe(heartbeat("a", queue_depth=1, in_flight=1, sent_at_ms=0), now_ms=0)
    reg.note_routed("a")
    reg.note_routed("a")
    assert reg.get("a", now_ms=1)
    assert reg.alive(1)[0].load == 4
    reg.observe(heartbeat("a", queue_depth=1, in_flight=1, sent_at_ms=10), now_ms=10)
    assert reg.alive(10)[0].load == 2


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError):
        NodeRegistry(ttl_s=0)

"""fedllm.common.heartbeats: the one heartbeat registry (router and gateway)."""

from __future__ import annotations

from typing import Any

import pytest

from fedllm.common.heartbeats import HeartbeatRegistry


def _reg(capacity: int | None = None) -> HeartbeatRegistry[dict[str, Any]]:
    return HeartbeatRegistry(ttl_ms=1_000, seen_ms=lambda r: r["at"], capacity=capacity)


def test_joins_liveness_and_expiry() -> None:
    reg = _reg()
    assert reg.observe("h1", {"at": 0}, now_ms=0) is True  # first heartbeat: joined
    assert reg.observe("h1", {"at": 500}, now_ms=500) is False  # still alive: no new join
    assert reg.observe("h2", {"at": 600}, now_ms=600) is True
    assert [r["at"] for r in reg.alive(1_499)] == [500, 600]
    assert reg.get("h1", now_ms=1_499) == {"at": 500}
    assert reg.get("h1", now_ms=1_500) is None  # TTL reached: now − seen < TTL is false
    assert reg.alive(1_500) == [{"at": 600}]
    assert dict(reg.latest) == {"h1": {"at": 500}, "h2": {"at": 600}}  # dead ones stay listed
    assert reg.expire(now_ms=1_500) == [{"at": 500}]
    assert list(reg.latest) == ["h2"]
    assert reg.observe("h1", {"at": 1_600}, now_ms=1_600) is True  # back: joins again


def test_older_value_never_replaces_a_newer_one() -> None:
    reg = _reg()
    reg.observe("h1", {"at": 900, "v": "new"}, now_ms=900)
    assert reg.observe("h1", {"at": 100, "v": "old"}, now_ms=950) is False
    assert reg.latest["h1"]["v"] == "new"
    reg.observe("h1", {"at": 900, "v": "same time"}, now_ms=950)  # ties: the later arrival
    assert reg.latest["h1"]["v"] == "same time"


def test_rejoin_after_silence_and_stale_value() -> None:
    reg = _reg()
    reg.observe("h1", {"at": 0}, now_ms=0)
    assert reg.observe("h1", {"at": 2_000}, now_ms=2_000) is True  # silent past the TTL
    # a value already stale when it arrives is kept (the gateway lists it) but is no join
    assert reg.observe("h2", {"at": 0}, now_ms=5_000) is False
    assert "h2" in reg.latest and reg.get("h2", now_ms=5_000) is None


def test_capacity_evicts_the_node_seen_longest_ago() -> None:
    reg = _reg(capacity=2)
    reg.observe("a", {"at": 10}, now_ms=10)
    reg.observe("b", {"at": 5}, now_ms=10)
    reg.observe("a", {"at": 20}, now_ms=20)  # known: no eviction
    reg.observe("c", {"at": 30}, now_ms=30)
    assert sorted(reg.latest) == ["a", "c"]


def test_put_and_view_and_refusals() -> None:
    reg = _reg()
    view = reg.latest
    reg.observe("h1", {"at": 0}, now_ms=0)
    reg.put("h1", {"at": 0, "routed": 1})
    assert view["h1"] == {"at": 0, "routed": 1}  # the view is live
    with pytest.raises(TypeError):
        view["x"] = {"at": 0}  # type: ignore[index]
    with pytest.raises(KeyError):
        reg.put("unknown", {"at": 0})
    with pytest.raises(ValueError):
        HeartbeatRegistry(ttl_ms=0, seen_ms=lambda r: 0)
    with pytest.raises(ValueError):
        HeartbeatRegistry(ttl_ms=1, seen_ms=lambda r: 0, capacity=0)

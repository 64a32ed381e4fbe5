"""The router against the real broker, with real peers (fake nodes speaking Kafka + Avro).

One router runs for the module; each test uses its own hospital ids and names them in the
request's `hospitals`, so the tests do not see each other's nodes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, ensure_topics, make_producer, now_ms
from fedllm.common.lifecycle import ready_path
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.router.service import RouterService
from tests.kafka_helpers import unique_namespace
from tests.router.helpers import decision, request
from tests.router.peers import FakeNode, Watcher

pytestmark = pytest.mark.asyncio(loop_scope="session")

HOSPITALS = [f"rt_{c}" for c in "abcdefghijklmnop"]
NODE_TIMEOUT_S = 2.0
NODE_TTL_S = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def settings(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = Settings(
        KAFKA_BOOTSTRAP=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        node_ttl_s=NODE_TTL_S,
        node_timeout_s=NODE_TIMEOUT_S,
        session_timeout_ms=6_000,
        data_dir=Path(tmp_path_factory.mktemp("router")),
        node_admission="open",  # the rt_* test nodes are not configured hospitals
    )
    await ensure_topics(s, topics.all_topics(HOSPITALS))
    return s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def router(settings: Settings) -> AsyncIterator[RouterService]:
    service = RouterService(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(stop))
    deadline = time.monotonic() + 30
    while not ready_path(settings, "router").exists():
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
        assert time.monotonic() < deadline, "router not ready in 30 s"
        await asyncio.sleep(0.05)
    yield service
    stop.set()
    await asyncio.wait_for(task, 15)
    assert not ready_path(settings, "router").exists()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def watcher(settings: Settings) -> AsyncIterator[Watcher]:
    w = await Watcher(
        settings, topics.NODE_RESULTS, topics.AUDIT, topics.dlq(topics.DECISIONS)
    ).start()
    yield w
    await w.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    producer = make_producer(settings)
    await producer.start()
    yield Bus(producer, settings.topic_namespace)
    await producer.stop()


async def nodes(router: RouterService, *peers: FakeNode) -> list[FakeNode]:
    """Start the peers and wait until the router knows them all."""
    for peer in peers:
        await peer.start()
    deadline = time.monotonic() + 10
    while any(
        router.dispatcher.registry.get(p.hospital_id, now_ms=now_ms()) is None for p in peers
    ):
        assert time.monotonic() < deadline, "router did not register the nodes"
        await asyncio.sleep(0.02)
    return list(peers)


async def submit(bus: Bus, department: str, hospitals: list[str], kind: str = "generate") -> dict:
    now = now_ms()
    req = request(
        f"req-{uuid.uuid4().hex[:8]}",
        department=department,
        hospitals=tuple(hospitals),
        created_ms=now,
        deadline_ms=now + 60_000,
    )
    if kind == "aggregate":
        req.update(kind="aggregate", prompt='{"op": "count"}')
    await bus.send(
        topics.DECISIONS, "BudgetDecision", decision(req, at_ms=now), key=req["request_id"]
    )
    return req


def of(req: dict, status: str | None = None) -> Callable[[Any], bool]:
    rid = req["request_id"]
    return lambda r: (
        isinstance(r, dict)
        and r.get("request_id") == rid
        and (status is None or r.get("status") == status)
    )


def audit_of(req: dict, action: str) -> Callable[[Any], bool]:
    rid = req["request_id"]
    return lambda r: r.get("request_id") == rid and r.get("action") == action


def mine(node: FakeNode, req: dict) -> list[dict]:
    """What `node` received for `req` (other tests' traffic on the shared broker is ignored)."""
    return [r for r in node.received if r["request"]["request_id"] == req["request_id"]]


async def closed(router: RouterService, req: dict, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not router.dispatcher.is_finished(req["request_id"]):
        assert time.monotonic() < deadline, "request not closed"
        await asyncio.sleep(0.02)


async def test_routes_to_department_matching_least_loaded_node(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    a, b, c = await nodes(
        router,
        FakeNode(settings, "rt_a", ("cardiology",), load=3),
        FakeNode(settings, "rt_b", ("cardiology", "general"), load=0),
        FakeNode(settings, "rt_c", ("general",), load=0),
    )
    try:
        req = await submit(bus, "cardiology", ["rt_a", "rt_b", "rt_c"])
        result = await watcher.wait_for(topics.NODE_RESULTS, of(req, "ok"))
        assert result["node_id"] == "rt_b" and result["attempt"] == 1
        routed = await watcher.wait_for(topics.AUDIT, audit_of(req, "request.routed"))
        assert routed["hospital_id"] == "rt_b" and routed["details"]["attempt"] == "1"
        await closed(router, req)
        (routed_b,) = mine(b, req)
        assert routed_b["attempt"] == 1
        assert routed_b["deadline_ms"] <= now_ms() + NODE_TIMEOUT_S * 1000
        assert mine(a, req) == [] and mine(c, req) == []
        # a replayed decision is ignored
        await bus.send(
            topics.DECISIONS, "BudgetDecision", decision(req, at_ms=now_ms()), key=req["request_id"]
        )
        await asyncio.sleep(0.5)
        assert len(mine(b, req)) == 1
    finally:
        for n in (a, b, c):
            await n.stop()


async def test_silent_node_is_retried_on_another_node(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    silent, backup = await nodes(
        router,
        FakeNode(settings, "rt_d", ("radiology",), answers=False),
        FakeNode(settings, "rt_e", ("radiology",), load=2),
    )
    try:
        req = await submit(bus, "radiology", ["rt_d", "rt_e"])
        result = await watcher.wait_for(
            topics.NODE_RESULTS, of(req, "ok"), timeout_s=NODE_TIMEOUT_S + 5
        )
        assert result["node_id"] == "rt_e" and result["attempt"] == 2
        retried = await watcher.wait_for(topics.AUDIT, audit_of(req, "request.retried"))
        assert retried["hospital_id"] == "rt_e" and "did not answer" in retried["reason"]
        await closed(router, req)
        assert [r["attempt"] for r in mine(silent, req)] == [1]
        assert [r["attempt"] for r in mine(backup, req)] == [2]
    finally:
        await silent.stop()
        await backup.stop()


async def test_both_silent_gives_failed_result(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    peers = await nodes(
        router,
        FakeNode(settings, "rt_f", ("research",), answers=False),
        FakeNode(settings, "rt_g", ("research",), answers=False),
    )
    try:
        req = await submit(bus, "research", ["rt_f", "rt_g"])
        result = await watcher.wait_for(
            topics.NODE_RESULTS, of(req, "failed"), timeout_s=2 * NODE_TIMEOUT_S + 5
        )
        assert result["attempt"] == 2 and result["node_id"] == ""
        assert result["user_id"] == req["user_id"]
        assert "no attempts left" in result["reason"]
        await watcher.wait_for(topics.AUDIT, audit_of(req, "request.route_failed"))
        assert sorted(len(mine(p, req)) for p in peers) == [1, 1]
        assert watcher.records(topics.NODE_RESULTS, of(req, "ok")) == []
    finally:
        for p in peers:
            await p.stop()


async def test_no_eligible_node_fails_at_once(
    router: RouterService, watcher: Watcher, bus: Bus
) -> None:
    req = await submit(bus, "general", ["rt_nowhere"])
    result = await watcher.wait_for(topics.NODE_RESULTS, of(req, "failed"), timeout_s=5)
    assert "no eligible node" in result["reason"] and result["attempt"] == 0


async def test_node_whose_heartbeats_stop_leaves_and_its_request_moves(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    fading, steady = await nodes(
        router,
        FakeNode(settings, "rt_h", ("emergency",), answers=False),
        FakeNode(settings, "rt_i", ("emergency",), load=5),
    )
    try:
        req = await submit(bus, "emergency", ["rt_h", "rt_i"])
        await watcher.wait_for(topics.AUDIT, audit_of(req, "request.routed"))
        fading.beating = False
        left = await watcher.wait_for(
            topics.AUDIT,
            lambda r: r.get("action") == "node.left" and r.get("hospital_id") == "rt_h",
            timeout_s=NODE_TTL_S + 3,
        )
        assert left["service"] == "router"
        result = await watcher.wait_for(topics.NODE_RESULTS, of(req, "ok"), timeout_s=5)
        assert result["node_id"] == "rt_i" and result["attempt"] == 2
        retried = await watcher.wait_for(topics.AUDIT, audit_of(req, "request.retried"))
        assert "left the registry" in retried["reason"]
        assert router.dispatcher.registry.get("rt_h", now_ms=now_ms()) is None
    finally:
        await fading.stop()
        await steady.stop()


async def test_undecodable_decision_is_dead_lettered_and_routing_goes_on(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    (node,) = await nodes(router, FakeNode(settings, "rt_j", ("general",)))
    try:
        # valid schema headers over a corrupt body, and a message with no headers at all
        _, headers = codec.encode(
            "BudgetDecision", decision(request("garbage", created_ms=0, deadline_ms=1), at_ms=0)
        )
        wire = topics.scoped(settings, topics.DECISIONS)
        await bus.producer.send_and_wait(
            wire, value=b"\xff\x00not avro", headers=headers, key=b"garbage"
        )
        await bus.producer.send_and_wait(wire, value=b"no headers at all")
        await watcher.wait_for(
            topics.dlq(topics.DECISIONS), lambda r: r == b"no headers at all", timeout_s=5
        )
        assert watcher.records(topics.dlq(topics.DECISIONS), lambda r: r == b"\xff\x00not avro")
        req = await submit(bus, "general", ["rt_j"])
        result = await watcher.wait_for(topics.NODE_RESULTS, of(req, "ok"), timeout_s=5)
        assert result["node_id"] == "rt_j"
    finally:
        await node.stop()


async def test_aggregate_over_two_hospitals_is_combined_into_one_result(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    a, b = await nodes(
        router,
        FakeNode(settings, "rt_l", ("general",), count=12),
        FakeNode(settings, "rt_m", ("general",), count=30),
    )
    try:
        req = await submit(bus, "general", ["rt_l", "rt_m"], kind="aggregate")
        result = await watcher.wait_for(topics.NODE_RESULTS, of(req, "ok"), timeout_s=5)
        assert result["node_id"] == "rt_l,rt_m" and result["is_private"]
        assert "About 42 patients" in result["response"]
        half = PrivacyCurve.from_rho(
            0.5 * rho_for_epsilon(epsilon=req["epsilon"], delta=req["delta"])
        )
        assert result["rdp_epsilons"] == pytest.approx(list((2 * half).values))
        assert result["privacy_cost"] <= req["epsilon"] + 1e-9
        parts = watcher.records(topics.NODE_RESULTS, of(req, "partial"))
        assert sorted(p["node_id"] for p in parts) == ["rt_l", "rt_m"]
        for node in (a, b):
            (routed,) = mine(node, req)
            assert routed["budget_share"] == 0.5 and routed["parts"] == 2
        await watcher.wait_for(topics.AUDIT, audit_of(req, "request.combined"))
        await closed(router, req)
        await asyncio.sleep(0.3)
        assert len(watcher.records(topics.NODE_RESULTS, of(req, "ok"))) == 1
    finally:
        await a.stop()
        await b.stop()


async def test_aggregate_with_a_silent_hospital_fails_carrying_the_answered_curve(
    router: RouterService, watcher: Watcher, bus: Bus, settings: Settings
) -> None:
    a, silent = await nodes(
        router,
        FakeNode(settings, "rt_n", ("general",)),
        FakeNode(settings, "rt_o", ("general",), answers=False),
    )
    try:
        req = await submit(bus, "general", ["rt_n", "rt_o"], kind="aggregate")
        result = await watcher.wait_for(
            topics.NODE_RESULTS, of(req, "failed"), timeout_s=NODE_TIMEOUT_S + 5
        )
        assert result["node_id"] == ""
        assert "rt_o did not answer in time" in result["reason"]
        assert "partial release" in result["reason"]
        half = PrivacyCurve.from_rho(
            0.5 * rho_for_epsilon(epsilon=req["epsilon"], delta=req["delta"])
        )
        assert result["rdp_epsilons"] == pytest.approx(list(half.values))
        assert result["privacy_cost"] == pytest.approx(half.epsilon(delta=req["delta"]))
        assert len(mine(silent, req)) == 1  # no retry: the answered part already spent
        assert watcher.records(topics.NODE_RESULTS, of(req, "ok")) == []
    finally:
        await a.stop()
        await silent.stop()

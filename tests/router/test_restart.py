"""A router restart mid-flight (issue 19, item 6), on the real broker and ledger.

The accountant (in-process, real Postgres ledger) reserves a request and publishes its decision;
the router routes it to fake nodes; the router is then killed with work in flight and a new
router process-equivalent (a fresh `RouterService`, empty memory, same `router_id`) starts. The
new one must re-derive what the old one supervised from the topics: answered fan-out parts are
combined and charged (not refunded), a failure that arrived while no router ran is retried, a
replayed decision is not routed twice, and each request gets exactly one terminal verdict.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fedllm.common import topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.db import make_engine
from fedllm.common.kafka import Bus, ensure_topics, make_producer, now_ms
from fedllm.common.lifecycle import ready_path
from fedllm.common.results import from_router
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.services.accountant.handlers import Accountant
from fedllm.services.accountant.ledger import Ledger
from fedllm.services.router.service import RouterService
from tests.accountant.test_deadline import reserve
from tests.kafka_helpers import inference_request, unique_namespace
from tests.router.peers import FakeNode, Watcher

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]

DEPT = "cardiology"


@pytest_asyncio.fixture(loop_scope="session")
async def settings(
    kafka_bootstrap: str, fresh_database_url: str, tmp_path: Path
) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:6]
    s = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        database_url=fresh_database_url,
        mode="demo",
        hospitals=[HospitalConfig(id=f"rs{tag}_{c}", departments=[DEPT]) for c in "abc"],
        node_ttl_s=1.0,
        node_timeout_s=8.0,
        session_timeout_ms=6_000,
        router_id=f"router-{tag}",
        router_strategy="least_load",
        data_dir=tmp_path,
    )
    await ensure_topics(s, topics.all_topics([h.id for h in s.hospitals]))
    yield s


class Running:
    """A router serving in this loop; `kill()` drops it with its memory."""

    def __init__(self, settings: Settings) -> None:
        self.service = RouterService(settings)
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.service.serve(self.stop))
        self.settings = settings

    async def ready(self) -> Running:
        deadline = time.monotonic() + 30
        while not ready_path(self.settings, "router").exists():
            assert not self.task.done(), "router exited"
            assert time.monotonic() < deadline, "router not ready in 30 s"
            await asyncio.sleep(0.05)
        return self

    async def knows(self, *nodes: FakeNode) -> None:
        deadline = time.monotonic() + 10
        registry = self.service.dispatcher.registry
        while any(registry.get(n.hospital_id, now_ms=now_ms()) is None for n in nodes):
            assert time.monotonic() < deadline, "router did not register the nodes"
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def until(pred: Any, timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"{what} not met in {timeout_s}s"
        await asyncio.sleep(0.05)


def of(rid: str) -> Any:
    return lambda r: isinstance(r, dict) and r.get("request_id") == rid


async def test_a_router_restart_combines_and_charges_fan_out_parts_and_retries_failures(
    settings: Settings,
) -> None:
    a, b, c = (h.id for h in settings.hospitals)
    engine = make_engine(settings.database_url)
    producer = make_producer(settings)
    await producer.start()
    bus = Bus(producer, settings.topic_namespace)
    acct = Accountant(settings, Ledger(engine, settings.budget, RdpAccountant()), bus)
    node_a = await FakeNode(settings, a, (DEPT,)).start()
    node_b = await FakeNode(settings, b, (DEPT,), answers=False).start()  # holds its work
    node_c = await FakeNode(settings, c, (DEPT,)).start()
    watcher = await Watcher(settings, topics.NODE_RESULTS, topics.DECISIONS).start()
    first = await Running(settings).ready()
    second: Running | None = None
    try:
        await first.knows(node_a, node_b, node_c)
        fan = inference_request(
            user_id=f"u-{uuid.uuid4().hex[:6]}",
            department=DEPT,
            kind="aggregate",
            prompt='{"op": "count"}',
            hospitals=[a, b],
            epsilon=1.0,
        )
        single = inference_request(
            user_id=f"u-{uuid.uuid4().hex[:6]}", department=DEPT, hospitals=[b, c]
        )
        node_b.load = 0
        node_c.load = 50  # least load: the single request goes to b first
        await asyncio.sleep(0.3)
        for req in (fan, single):
            await reserve(acct, req)  # publishes the decision; the router routes it

        fid, sid = fan["request_id"], single["request_id"]
        await watcher.wait_for(topics.NODE_RESULTS, lambda r: of(fid)(r) and r["node_id"] == a)
        await until(lambda: {r["request"]["request_id"] for r in node_b.received} >= {fid, sid})
        await first.kill()  # a's part answered, b's part and b's single attempt still running

        # While no router runs: b answers its part, and fails the single request.
        held = {r["request"]["request_id"]: r for r in node_b.received}
        await node_b._answer_part(held[fid])
        await bus.send(
            topics.NODE_RESULTS,
            "InferenceResult",
            {
                "request_id": sid,
                "user_id": single["user_id"],
                "department": DEPT,
                "status": "failed",
                "reason": "model crashed",
                "node_id": b,
                "attempt": held[sid]["attempt"],
                "finished_at_ms": now_ms(),
            },
            key=single["user_id"],
        )
        # A duplicate delivery of the fan-out's decision (as if its commit had been lost).
        decision = watcher.records(topics.DECISIONS, of(fid))[0]
        await bus.send(topics.DECISIONS, "BudgetDecision", decision, key=fid)

        second = await Running(settings).ready()
        assert second.service.restored >= 2

        combined = await watcher.wait_for(
            topics.NODE_RESULTS, lambda r: of(fid)(r) and from_router(r), timeout_s=15
        )
        assert combined["status"] == "ok" and combined["node_id"] == f"{a},{b}"
        retried = await watcher.wait_for(
            topics.NODE_RESULTS,
            lambda r: of(sid)(r) and r["status"] == "ok" and r["node_id"] == c,
            timeout_s=15,
        )
        assert retried["attempt"] == 2
        await asyncio.sleep(settings.node_timeout_s + 1)  # past every deadline: no 2nd verdict
        for rid in (fid, sid):
            verdicts = [
                r
                for r in watcher.records(topics.NODE_RESULTS, of(rid))
                if from_router(r) or r["status"] == "ok"
            ]
            assert len(verdicts) == 1, verdicts
        assert [r["request"]["request_id"] for r in node_a.received].count(fid) == 1

        # Charges: the accountant sees what the node-results topic carried, in order.
        await acct.on_node_results(list(watcher.records(topics.NODE_RESULTS, of(fid))))
        await acct.on_node_results(list(watcher.records(topics.NODE_RESULTS, of(sid))))
        parts = [
            PrivacyCurve(tuple(r["rdp_orders"]), tuple(r["rdp_epsilons"]))
            for r in watcher.records(topics.NODE_RESULTS, of(fid))
            if r["status"] == "partial"
        ]
        assert len(parts) == 2
        both = acct.ledger.accountant.compose(*parts)
        entry = acct.ledger.entry(fid)
        assert (entry["state"], entry["outcome"]) == ("committed", "ok")
        assert entry["spent_epsilon"] == pytest.approx(both.epsilon(delta=fan["delta"]), rel=1e-6)
        assert entry["spent_epsilon"] == pytest.approx(combined["privacy_cost"], rel=1e-6)
        assert acct.ledger.entry(sid)["state"] != "reserved"  # settled on c's answer
    finally:
        for running in (first, second):
            if running is not None:
                await running.kill()
        for peer in (node_a, node_b, node_c):
            await peer.stop()
        await watcher.stop()
        await producer.stop()
        engine.dispose()

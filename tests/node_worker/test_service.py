"""The node worker's Kafka loop in process, against the real broker, with a stub engine."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fedllm.common import topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.kafka import ensure_topics, now_ms
from fedllm.common.lifecycle import ready_path
from fedllm.services.node_worker.service import run, wait_ready
from tests.kafka_helpers import (
    GRANT_PUBLIC,
    collect,
    inference_request,
    produce,
    produce_raw,
    unique_namespace,
    with_grant,
)


class StubEngine:
    model_name = "stub"
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def answer_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.answer(r) for r in requests]

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(request["request_id"])
        if request["request"]["prompt"] == "boom":
            raise RuntimeError("model exploded")
        time.sleep(1.5)  # long enough for heartbeats to be due meanwhile
        return {
            "status": "ok",
            "response": "fine",
            "is_private": True,
            "privacy_cost": 0.5,
            "delta": 1e-5,
            "rdp_orders": [2.0],
            "rdp_epsilons": [0.1],
            "tokens": 3,
            "records_used": 2,
            "model_time_ms": 1500.0,
        }


def routed(
    hid: str, *, prompt: str = "q", deadline_ms: int | None = None, granted: bool = True
) -> dict[str, Any]:
    req = inference_request(prompt=prompt, epsilon=1.0)
    out = {
        "request_id": req["request_id"],
        "hospital_id": hid,
        "attempt": 1,
        "reserved_epsilon": 1.0,
        "delta": 1e-5,
        "deadline_ms": deadline_ms if deadline_ms is not None else req["deadline_ms"],
        "routed_at_ms": now_ms(),
        "request": req,
    }
    return with_grant(out) if granted else out


@pytest.fixture
def settings(kafka_bootstrap: str, tmp_path: Path) -> Settings:
    hid = f"h{uuid.uuid4().hex[:8]}"
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        data_dir=tmp_path,
        heartbeat_interval_s=0.3,
        reservation_verify_key=GRANT_PUBLIC,
        hospitals=[HospitalConfig(id=hid, departments=["cardiology", "general"])],
    )


async def test_node_loop_end_to_end(settings: Settings) -> None:
    hid = settings.hospitals[0].id
    topic = topics.hospital_requests(hid)
    await ensure_topics(settings, {**topics.all_topics([hid])})
    stub = StubEngine()
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=lambda s, h: stub))
    try:
        await wait_ready(settings, hid, timeout_s=60)
        ok, late, boom = (
            routed(hid),
            routed(hid, deadline_ms=now_ms() - 1),
            routed(hid, prompt="boom"),
        )
        await produce(settings, topic, "RoutedRequest", ok, key=hid)
        await produce_raw(settings, topic, b"garbage", [("fedllm-fp", b"nope")])
        await produce(settings, topic, "RoutedRequest", late, key=hid)
        await produce(settings, topic, "RoutedRequest", boom, key=hid)
        await produce(settings, topic, "RoutedRequest", ok, key=hid)  # a redelivery
        ids = {ok["request_id"], late["request_id"], boom["request_id"]}

        def mine(rs: list[dict]) -> list[dict]:
            return [r for r in rs if r.get("request_id") in ids]

        results = mine(
            await collect(
                settings, topics.NODE_RESULTS, until=lambda rs: len(mine(rs)) >= 4, timeout_s=60
            )
        )
        by_id: dict[str, list[dict]] = {}
        for r in results:
            by_id.setdefault(r["request_id"], []).append(r)
        first = by_id[ok["request_id"]]
        assert len(first) == 2 and all(r["status"] == "ok" for r in first)
        assert first[0]["node_id"] == hid and first[0]["attempt"] == 1 and first[0]["is_private"]
        # No timing and no record count leaves the node, whatever the engine says (issue #11).
        assert first[0]["processing_time_ms"] == 0.0 and first[0]["model_time_ms"] == 0.0
        assert first[0]["records_used"] == 0 and first[0]["finished_at_ms"] > 0
        assert stub.calls.count(ok["request_id"]) == 1  # replay answered from cache, no 2nd DP run
        assert by_id[late["request_id"]][0]["status"] == "failed"
        assert by_id[late["request_id"]][0]["reason"] == "deadline passed before start"
        assert late["request_id"] not in stub.calls
        assert by_id[boom["request_id"]][0]["status"] == "failed"
        # What the error says stays in the node's log: its text may depend on the records.
        assert by_id[boom["request_id"]][0]["reason"] == "internal error; nothing released"

        dlq = await collect(
            settings, topics.dlq(topic), until=lambda rs: len(rs) >= 1, timeout_s=20, raw=True
        )
        assert dlq and dlq[0].value == b"garbage"

        beats = [
            b
            for b in await collect(
                settings,
                topics.HEARTBEATS,
                until=lambda rs: sum(b["hospital_id"] == hid for b in rs) >= 5,
                timeout_s=20,
            )
            if b["hospital_id"] == hid
        ]
        assert beats[-1]["healthy"] and beats[-1]["model"] == "stub"
        assert all(b["recent_latency_ms"] == 0.0 for b in beats)
        assert beats[-1]["departments"] == ["cardiology", "general"]
        # Heartbeats kept flowing while a request was being answered.
        assert any(b["in_flight"] == 1 for b in beats)

        audits = [
            a
            for a in await collect(
                settings,
                topics.AUDIT,
                until=lambda rs: len([a for a in rs if a["request_id"] in ids]) >= 3,
                timeout_s=20,
            )
            if a["request_id"] in ids
        ]
        actions = {a["request_id"]: a["action"] for a in audits}
        assert actions[ok["request_id"]] == "node.answered"
        assert actions[boom["request_id"]] == "node.failed"
        assert all("fine" not in str(a) for a in audits)  # never the answer text
        assert all(a.get("records_used", 0) == 0 for a in audits)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    assert not ready_path(settings, f"node-{hid}").exists()


async def test_node_refuses_routed_requests_without_a_valid_grant(settings: Settings) -> None:
    """Whoever writes hospital.<id>.requests without the accountant's signature gets no
    release: no grant, a grant for another hospital, a forged signature, an inflated ε, a
    tampered prompt."""
    hid = settings.hospitals[0].id
    topic = topics.hospital_requests(hid)
    await ensure_topics(settings, {**topics.all_topics([hid])})
    stub = StubEngine()
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=lambda s, h: stub))
    try:
        await wait_ready(settings, hid, timeout_s=60)
        missing = routed(hid, granted=False)
        elsewhere = with_grant(routed(hid, granted=False), hospital_id="another_hospital")
        forged = routed(hid, granted=False)
        forged["request"]["grants"] = {hid: base64.b64encode(b"x" * 64).decode()}
        inflated = routed(hid)
        inflated["reserved_epsilon"] = 5.0
        tampered = routed(hid)
        tampered["request"]["prompt"] = "another question"
        good = routed(hid)
        bad = [missing, elsewhere, forged, inflated, tampered]
        for r in [*bad, good]:
            await produce(settings, topic, "RoutedRequest", r, key=hid)
        ids = {r["request_id"] for r in [*bad, good]}
        results = {
            r["request_id"]: r
            for r in await collect(
                settings,
                topics.NODE_RESULTS,
                until=lambda rs: len({x["request_id"] for x in rs} & ids) >= len(ids),
                timeout_s=60,
            )
            if r["request_id"] in ids
        }
        assert results[good["request_id"]]["status"] == "ok"
        for r in bad:
            out = results[r["request_id"]]
            assert out["status"] == "failed" and out["reason"].startswith("refused:"), out
            assert not out["is_private"] and out["privacy_cost"] == 0.0
        assert stub.calls == [good["request_id"]]  # the engine never saw a refused request
        audits = await collect(
            settings,
            topics.AUDIT,
            until=lambda rs: (
                sum(a["action"] == "node.grant_refused" and a["request_id"] in ids for a in rs) >= 5
            ),
            timeout_s=20,
        )
        refused = {a["request_id"] for a in audits if a["action"] == "node.grant_refused"}
        assert refused == {r["request_id"] for r in bad}
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


@pytest.mark.slow
async def test_high_priority_overtakes_queued_work(settings: Settings) -> None:
    """Requests already queued at the node when it starts: high first, then normal, then low."""
    hid = settings.hospitals[0].id
    topic = topics.hospital_requests(hid)
    await ensure_topics(settings, {**topics.all_topics([hid])})
    queued = []
    for prio in ("low", "normal", "low", "high"):
        r = routed(hid)
        r["request"]["priority"] = prio
        queued.append(r)
        await produce(settings, topic, "RoutedRequest", r, key=hid)
    stub = StubEngine()
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=lambda s, h: stub))
    try:
        ids = {r["request_id"] for r in queued}
        await collect(
            settings,
            topics.NODE_RESULTS,
            until=lambda rs: len([r for r in rs if r.get("request_id") in ids]) >= 4,
            timeout_s=60,
        )
        order = [r["request"]["priority"] for r in queued]
        by_id = dict(zip([r["request_id"] for r in queued], order, strict=True))
        assert [by_id[i] for i in stub.calls] == ["high", "normal", "low", "low"]
        assert stub.calls[2] == queued[0]["request_id"]  # FIFO within a priority
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)

"""Long model work (issue 19, item 8), the node loop in process against the real broker.

- Work longer than the group's session timeout, between two polls, keeps the membership when
  `node_max_poll_interval_s` covers it: every offset commit succeeds and nothing is redelivered.
- Work longer than a (deliberately short) poll interval gets the node evicted: the commit fails,
  the node does not die, re-joins, answers the redelivered request from its replay store with
  the same release (the model is not run twice) and goes on with the next request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fedllm.common import topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.kafka import ensure_topics
from fedllm.services.node_worker.service import run, wait_ready
from tests.kafka_helpers import GRANT_PUBLIC, collect, produce, unique_namespace
from tests.node_worker.test_service import routed

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.slow]


class SlowEngine:
    """Answers after `work_s` for prompt "slow", at once otherwise; counts model runs."""

    model_name = "stub"
    device = "cpu"

    def __init__(self, work_s: float) -> None:
        self.work_s = work_s
        self.calls: list[str] = []

    def answer_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.answer(r) for r in requests]

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(request["request_id"])
        if request["request"]["prompt"] == "slow":
            time.sleep(self.work_s)
        return {
            "status": "ok",
            "response": f"answer {len(self.calls)}",
            "is_private": True,
            "privacy_cost": 0.5,
            "delta": 1e-5,
            "rdp_orders": [2.0],
            "rdp_epsilons": [0.1],
            "tokens": 3,
            "records_used": 2,
            "model_time_ms": 0.0,
        }


def node_settings(
    kafka_bootstrap: str, tmp_path: Path, *, max_poll_s: float, intake: int = 32
) -> Settings:
    return Settings(
        node_intake_capacity=intake,
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        data_dir=tmp_path,
        heartbeat_interval_s=0.3,
        session_timeout_ms=6_000,
        node_max_poll_interval_s=max_poll_s,
        reservation_verify_key=GRANT_PUBLIC,
        hospitals=[HospitalConfig(id=f"lw{uuid.uuid4().hex[:8]}", departments=["cardiology"])],
    )


async def serve_and_collect(
    settings: Settings, engine: SlowEngine, requests: list[dict], *, want: int
) -> tuple[list[dict], asyncio.Task[None]]:
    hid = settings.hospitals[0].id
    await ensure_topics(settings, topics.all_topics([hid]))
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=lambda s, h: engine))
    await wait_ready(settings, hid, timeout_s=60)
    for r in requests:
        await produce(settings, topics.hospital_requests(hid), "RoutedRequest", r, key=hid)
    ids = {r["request_id"] for r in requests}
    results = [
        r
        for r in await collect(
            settings,
            topics.NODE_RESULTS,
            until=lambda rs: sum(r.get("request_id") in ids for r in rs) >= want,
            timeout_s=90,
        )
        if r.get("request_id") in ids
    ]
    return results, task


async def stop_node(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_work_longer_than_the_session_keeps_the_membership(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = node_settings(kafka_bootstrap, tmp_path, max_poll_s=60)
    hid = settings.hospitals[0].id
    engine = SlowEngine(work_s=4.0)
    caplog.set_level(logging.WARNING, logger="fedllm.services.node_worker.service")
    # Two slow requests fetched in one batch: ~8 s between polls, past the 6 s session timeout.
    slow = [routed(hid, prompt="slow"), routed(hid, prompt="slow")]
    results, task = await serve_and_collect(settings, engine, slow, want=2)
    try:
        await asyncio.sleep(2)  # a redelivery after a lost membership would show up here
        assert not task.done()
        assert sorted(engine.calls) == sorted(r["request_id"] for r in slow)
        assert "offset commit failed" not in caplog.text
    finally:
        await stop_node(task)
    assert len(results) == 2


async def test_an_evicted_node_survives_the_failed_commit_and_replays_identically(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One request fetched at a time: the queue drains after the slow one, so its commit is tried
    # (and fails) before the fast one is fetched.
    settings = node_settings(kafka_bootstrap, tmp_path, max_poll_s=2, intake=1)
    hid = settings.hospitals[0].id
    engine = SlowEngine(work_s=6.0)
    caplog.set_level(logging.WARNING, logger="fedllm.services.node_worker.service")
    slow, fast = routed(hid, prompt="slow"), routed(hid, prompt="fast")
    # The slow one evicts the node (6 s of work, 2 s poll interval); its commit fails, it is
    # redelivered after the re-join and answered again from the replay store; then the fast one.
    results, task = await serve_and_collect(settings, engine, [slow, fast], want=3)
    try:
        assert not task.done(), "the node died on the failed commit"
        assert "offset commit failed" in caplog.text
        again = [r for r in results if r["request_id"] == slow["request_id"]]
        assert len(again) == 2
        same = ("response", "privacy_cost", "rdp_orders", "rdp_epsilons", "attempt")
        assert [again[0][k] for k in same] == [again[1][k] for k in same]
        assert engine.calls.count(slow["request_id"]) == 1  # no second draw
        assert any(r["request_id"] == fast["request_id"] for r in results)
    finally:
        await stop_node(task)

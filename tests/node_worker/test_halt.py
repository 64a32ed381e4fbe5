"""A halt on fedllm.control reaches the node: work it has not started ends failed, with no
mechanism run (so the accountant refunds it); after resume it answers again."""

from __future__ import annotations

import asyncio
import uuid

from fedllm.common import control, topics
from fedllm.common.kafka import Bus, ensure_topics, make_producer, now_ms
from fedllm.services.node_worker.service import run, wait_ready
from tests.kafka_helpers import collect, produce
from tests.node_worker.test_service import StubEngine, routed, settings  # noqa: F401


def command(action: str) -> dict:
    return {
        "command_id": uuid.uuid4().hex,
        "action": action,
        "target": "",
        "value": "",
        "reason": "node halt test",
        "actor_user_id": "adm",
        "actor_role": "admin",
        "issued_at_ms": now_ms(),
    }


async def publish(s, action: str) -> None:
    producer = make_producer(s)
    await producer.start()
    try:
        await control.publish(Bus(producer, s.topic_namespace), command(action))
    finally:
        await producer.stop()


async def test_halted_node_fails_queued_work_without_running_it(settings) -> None:  # noqa: F811
    hid = settings.hospitals[0].id
    topic = topics.hospital_requests(hid)
    await ensure_topics(settings, {**topics.all_topics([hid])})
    stub = StubEngine()
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, hid, stop=stop, engine_factory=lambda s, h: stub))
    try:
        await wait_ready(settings, hid, timeout_s=60)
        await publish(settings, "halt")
        await asyncio.sleep(1.0)  # the node's follower polls the control log
        try:
            halted = routed(hid)
            await produce(settings, topic, "RoutedRequest", halted, key=hid)
            (result,) = [
                r
                for r in await collect(
                    settings,
                    topics.NODE_RESULTS,
                    until=lambda rs: any(r["request_id"] == halted["request_id"] for r in rs),
                    timeout_s=30,
                )
                if r["request_id"] == halted["request_id"]
            ]
            assert result["status"] == "failed"
            assert result["reason"] == "processing halted: node halt test"
            assert not result.get("rdp_orders")  # no mechanism: refunded
            assert halted["request_id"] not in stub.calls
        finally:
            await publish(settings, "resume")
        await asyncio.sleep(1.0)
        after = routed(hid)
        await produce(settings, topic, "RoutedRequest", after, key=hid)
        results = await collect(
            settings,
            topics.NODE_RESULTS,
            until=lambda rs: any(r["request_id"] == after["request_id"] for r in rs),
            timeout_s=30,
        )
        assert [r["status"] for r in results if r["request_id"] == after["request_id"]] == ["ok"]
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)

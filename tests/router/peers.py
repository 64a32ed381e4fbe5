"""Real peers on the broker for the router tests: fake hospital nodes and topic watchers.

A `FakeNode` heartbeats and answers its `hospital.<id>.requests` topic like a node worker
(or stays silent); a `Watcher` decodes everything that lands on some topics. Both are plain
aiokafka loops against the real broker, not mocks, inside the settings' topic namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import rho_for_epsilon


async def _assign_from_end(consumer: Any, settings: Settings, topic_names: list[str]) -> None:
    """Assign the (logical) `topic_names`, in `settings`' namespace, from their ends."""
    await consumer.topics()
    wire = [topics.scoped(settings, t) for t in topic_names]
    tps = [TopicPartition(t, p) for t in wire for p in sorted(consumer.partitions_for_topic(t))]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)


class FakeNode:
    """A hospital node: heartbeats every `beat_s`; answers "ok" when `answers`, else is silent.

    A part of a fan-out (`parts` > 1) is answered "partial" with a noisy count of `count`,
    spending exactly its budget share of the reservation (ρ·share·α on every order)."""

    def __init__(
        self,
        settings: Settings,
        hospital_id: str,
        departments: tuple[str, ...],
        *,
        load: int = 0,
        answers: bool = True,
        beat_s: float = 0.1,
        count: int = 10,
    ) -> None:
        self.settings = settings
        self.hospital_id = hospital_id
        self.departments = departments
        self.load = load
        self.answers = answers
        self.beat_s = beat_s
        self.count = count
        self.received: list[dict[str, Any]] = []
        self.beating = True
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> FakeNode:
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.bus = Bus(self.producer, self.settings.topic_namespace)
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        await _assign_from_end(
            self.consumer, self.settings, [topics.hospital_requests(self.hospital_id)]
        )
        await self._beat()
        self._tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._serve())]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()

    async def _beat(self) -> None:
        await self.bus.send(
            topics.HEARTBEATS,
            "NodeHeartbeat",
            {
                "hospital_id": self.hospital_id,
                "departments": list(self.departments),
                "queue_depth": self.load,
                "in_flight": 0,
                "recent_latency_ms": 5.0,
                "model": "fake",
                "device": "cpu",
                "healthy": True,
                "sent_at_ms": now_ms(),
            },
            key=self.hospital_id,
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.beat_s)
            if self.beating:
                await self._beat()

    async def _serve(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for msgs in batch.values():
                for msg in msgs:
                    routed = codec.decode_expect("RoutedRequest", msg.value, msg.headers)
                    self.received.append(routed)
                    if self.answers:
                        await self._answer(routed)

    async def _answer(self, routed: dict[str, Any]) -> None:
        req = routed["request"]
        if routed["parts"] > 1:
            await self._answer_part(routed)
            return
        await self.bus.send(
            topics.NODE_RESULTS,
            "InferenceResult",
            {
                "request_id": req["request_id"],
                "user_id": req["user_id"],
                "department": req["department"],
                "status": "ok",
                "response": f"answer from {self.hospital_id}",
                "node_id": self.hospital_id,
                "attempt": routed["attempt"],
                "finished_at_ms": now_ms(),
            },
            key=req["user_id"],
        )

    async def _answer_part(self, routed: dict[str, Any]) -> None:
        req = routed["request"]
        rho = routed["budget_share"] * rho_for_epsilon(
            epsilon=routed["reserved_epsilon"], delta=routed["delta"]
        )
        curve = PrivacyCurve.from_rho(rho)
        release = {
            "op": "count",
            "field": None,
            "query_key": '{"op":"count"}',
            "noisy_count": self.count,
            "count_sd": 1.5,
        }
        await self.bus.send(
            topics.NODE_RESULTS,
            "InferenceResult",
            {
                "request_id": req["request_id"],
                "user_id": req["user_id"],
                "department": req["department"],
                "status": "partial",
                "response": "",
                "node_id": self.hospital_id,
                "attempt": routed["attempt"],
                "is_private": True,
                "privacy_cost": curve.epsilon(delta=routed["delta"]),
                "delta": routed["delta"],
                "rdp_orders": list(curve.orders),
                "rdp_epsilons": list(curve.values),
                "records_used": 20,
                "aggregate_json": json.dumps(release),
                "finished_at_ms": now_ms(),
            },
            key=req["user_id"],
        )


class Watcher:
    """Collects (topic, record or raw value) for every message on `topic_names` from now on.

    Topic names, given and recorded, are logical: the settings' namespace is put on and taken
    off."""

    def __init__(self, settings: Settings, *topic_names: str) -> None:
        self.settings = settings
        self.topic_names = list(topic_names)
        self.seen: list[tuple[str, Any]] = []

    async def start(self) -> Watcher:
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        await _assign_from_end(self.consumer, self.settings, self.topic_names)
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            for msgs in batch.values():
                for msg in msgs:
                    try:
                        _, record = codec.decode(msg.value, msg.headers)
                    except codec.DecodeError:
                        record = msg.value
                    # the logical name: the topic on the wire less the settings' namespace
                    topic = msg.topic.removeprefix(self.settings.topic_namespace)
                    self.seen.append((topic, record))

    def records(self, topic: str, pred: Callable[[Any], bool] = lambda r: True) -> list[Any]:
        return [r for t, r in self.seen if t == topic and pred(r)]

    async def wait_for(
        self, topic: str, pred: Callable[[Any], bool], *, timeout_s: float = 10.0
    ) -> Any:
        """The first matching record on `topic`, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.records(topic, pred)
            if found:
                return found[0]
            await asyncio.sleep(0.02)
        raise AssertionError(f"nothing matching on {topic} within {timeout_s}s")

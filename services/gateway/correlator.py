"""Result correlation, budget snapshots and the node registry: the gateway's group-less consumers.

`ResultCorrelator` reads `fedllm.results` from its end (manual `assign`, no group: every
gateway process sees every result) and completes the future registered for a request id.
`BudgetView` reads `fedllm.budgets` from the start of the current budget window (older
snapshots belong to spent windows and are never served, so start-up does not grow with history)
and keeps the latest BudgetStatus per user and the latest department remainder per department. `NodeView` reads `fedllm.heartbeats`
from `node_ttl_s` ago and keeps the latest NodeHeartbeat per hospital (for the admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from fedllm.common import codec, topics, tracing
from fedllm.common.config import Settings
from fedllm.common.heartbeats import HeartbeatRegistry
from fedllm.common.kafka import assign_all, make_consumer, seek_all, seek_to_time
from fedllm.schemas.records import BudgetStatus, InferenceResult, NodeHeartbeat

log = logging.getLogger(__name__)


class _AssignedReader:
    """One group-less consumer over every partition of one topic, with a read loop."""

    topic: str = ""
    from_end: bool = True
    schema: str = ""
    #: False: the shared short fetch wait (request/reply latency). Readers whose records are
    #: not on a request's path use `background_fetch_max_wait_ms`, so an idle gateway does not
    #: poll the broker 100×/s.
    background = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        self.assigned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"gateway-{self.topic}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
        self.assigned.clear()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _assign(self) -> AIOKafkaConsumer:
        overrides = (
            {"fetch_max_wait_ms": self.settings.background_fetch_max_wait_ms}
            if self.background
            else {}
        )
        consumer = make_consumer(self.settings, group_id=None, **overrides)
        topic = topics.scoped(self.settings, self.topic)
        await consumer.start()
        try:
            tps = await assign_all(consumer, topic, wait_s=math.inf)
            await self._seek(consumer, tps)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _seek(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Position the partitions and resolve that now, so nothing after "ready" is missed."""
        await seek_all(consumer, tps, to_end=self.from_end)

    async def _run(self) -> None:
        while True:
            try:
                self.consumer = await self._assign()
                self.assigned.set()
                while True:
                    batches = await self.consumer.getmany(timeout_ms=200, max_records=1000)
                    for records in batches.values():
                        for msg in records:
                            self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s reader failed (%r); reassigning", self.topic, exc)
                self.assigned.clear()
                if self.consumer is not None:
                    with contextlib.suppress(Exception):
                        await self.consumer.stop()
                    self.consumer = None
                await asyncio.sleep(1.0)

    def _handle(self, msg: Any) -> None:
        try:
            record = codec.decode_expect(self.schema, msg.value, msg.headers)
        except codec.DecodeError as exc:
            # Not dead-lettered here: every gateway reads every record; skipping is enough.
            log.warning(
                "skipping undecodable %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc
            )
            return
        if self.traced:  # the last hop of the request's trace
            with tracing.span(f"gateway {self.topic}", msg.headers):
                self.on_record(record)
        else:
            self.on_record(record)

    traced = False

    def on_record(self, record: Any) -> None:  # a record of `schema` (fedllm.schemas.records)
        raise NotImplementedError


class ResultCorrelator(_AssignedReader):
    """Completes waiters by request id. Unknown ids (old re-deliveries, other gateways'
    requests) go into a small bounded cache so that a waiter registered late still finds its
    result; duplicates of a settled request are ignored."""

    topic = topics.RESULTS
    from_end = True
    traced = True
    schema = "InferenceResult"

    def __init__(
        self, settings: Settings, *, orphan_capacity: int = 4096, orphan_ttl_s: float = 60.0
    ) -> None:
        super().__init__(settings)
        self._waiters: dict[str, asyncio.Future[InferenceResult]] = {}
        self._orphans: OrderedDict[str, tuple[float, InferenceResult]] = OrderedDict()
        self._orphan_capacity = orphan_capacity
        self._orphan_ttl_s = orphan_ttl_s

    def register(self, request_id: str) -> asyncio.Future[InferenceResult]:
        """A future for `request_id`'s terminal result; register BEFORE producing."""
        fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        early = self._orphans.pop(request_id, None)
        if early is not None and time.monotonic() - early[0] <= self._orphan_ttl_s:
            fut.set_result(early[1])
        else:
            self._waiters[request_id] = fut
        return fut

    def recent(self, request_id: str) -> InferenceResult | None:
        """A result this gateway read in the last `orphan_ttl_s`, if any (not consumed)."""
        hit = self._orphans.get(request_id)
        if hit is None or time.monotonic() - hit[0] > self._orphan_ttl_s:
            return None
        return hit[1]

    def discard(self, request_id: str) -> None:
        fut = self._waiters.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.cancel()

    @property
    def pending(self) -> int:
        return len(self._waiters)

    def on_record(self, record: InferenceResult) -> None:
        rid = record["request_id"]
        fut = self._waiters.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(record)
        # Kept briefly either way: a retry with the same Idempotency-Key registers again.
        self._orphans.setdefault(rid, (time.monotonic(), record))
        self._orphans.move_to_end(rid)
        while len(self._orphans) > self._orphan_capacity:
            self._orphans.popitem(last=False)


class BudgetView(_AssignedReader):
    """Latest BudgetStatus per user (by updated_at_ms) and per department, read from the start
    of the current budget window (what `routes_budget` may serve)."""

    topic = topics.BUDGETS
    from_end = False
    schema = "BudgetStatus"
    background = True

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.user_to_status: dict[str, BudgetStatus] = {}
        self.department_to_status: dict[str, BudgetStatus] = {}

    async def _seek(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        window = self.settings.budget.window_seconds
        since_ms = int(time.time() // window * window * 1000)
        await seek_to_time(consumer, tps, since_ms)

    def on_record(self, record: BudgetStatus) -> None:
        if record["window_start"] + record["window_seconds"] <= time.time():
            return  # a spent window's snapshot (record timestamps need not follow offsets)
        user, dept = record["user_id"], record["department"]
        old = self.user_to_status.get(user)
        if old is None or record["updated_at_ms"] >= old["updated_at_ms"]:
            self.user_to_status[user] = record
        old_dept = self.department_to_status.get(dept)
        if old_dept is None or record["updated_at_ms"] >= old_dept["updated_at_ms"]:
            self.department_to_status[dept] = record


class NodeView(_AssignedReader):
    """Latest NodeHeartbeat per hospital (by sent_at_ms), read from `node_ttl_s` ago: nodes
    silent for longer than that before this gateway started are not known to it; nodes that
    fall silent later stay listed, reported not alive."""

    topic = topics.HEARTBEATS
    schema = "NodeHeartbeat"
    background = True

    def __init__(self, settings: Settings, *, capacity: int = 10_000) -> None:
        super().__init__(settings)
        self.registry: HeartbeatRegistry[NodeHeartbeat] = HeartbeatRegistry(
            ttl_ms=int(settings.node_ttl_s * 1000),
            seen_ms=lambda rec: int(rec["sent_at_ms"]),
            capacity=capacity,  # bounded: forgets the node heard from longest ago
        )
        self.nodes = self.registry.latest  # the latest NodeHeartbeat per hospital (live view)
        self._since_ms = 0

    def _handle(self, msg: Any) -> None:
        # Record timestamps are set by producers and need not grow with offsets, so the time
        # lookup may position before older records: skip those here.
        if msg.timestamp is not None and 0 <= msg.timestamp < self._since_ms:
            return
        super()._handle(msg)

    async def _seek(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        since = int(time.time() * 1000) - int(self.settings.node_ttl_s * 1000)
        self._since_ms = since
        await seek_to_time(consumer, tps, since)

    def on_record(self, record: NodeHeartbeat) -> None:
        self.registry.observe(record["hospital_id"], record, now_ms=record["sent_at_ms"])

    def snapshot(self, now_ms: int) -> list[dict[str, Any]]:
        """Every known node, sorted by hospital id, with `alive` against `node_ttl_s`."""
        return [
            {
                **rec,
                "last_seen_ms": rec["sent_at_ms"],
                "alive": self.registry.is_alive(rec, now_ms=now_ms),
            }
            for _, rec in sorted(self.nodes.items())
        ]

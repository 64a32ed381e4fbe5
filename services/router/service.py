"""The router's Kafka loop (thin): feeds the pure `Dispatcher` and carries out its actions.

Consumers:
- `fedllm.decisions` in group "router"; offsets are committed after the batch's actions are sent.
  With a batch strategy (the assignment optimiser) a batch is what arrives within
  `router_batch_window_ms` of its first decision, placed jointly.
- `fedllm.heartbeats` and `fedllm.node-results`, all partitions by `assign()` without a group
  (every router instance needs every heartbeat and every answer). In-flight state lives in
  memory, so there is nothing to resume on these: heartbeats are read from `node_ttl_s` ago,
  node results from the end. After a crash the accountant's deadline backstop settles whatever
  this router was supervising; a replayed decision is routed again (node results are kept
  first-wins by the accountant).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from fedllm.common import audit, metrics, topics, tracing
from fedllm.common.config import Settings
from fedllm.common.delivery import RetryPolicy, deliver
from fedllm.common.kafka import (
    Bus,
    make_consumer,
    make_producer,
    now_ms,
    seek_to_time,
    wait_for_broker,
)
from fedllm.common.lifecycle import clear_ready, mark_ready
from fedllm.services.router.dispatcher import SERVICE, Action, Audit, Dispatcher, Send
from fedllm.services.router.metrics import RouterMetrics, process_metrics
from fedllm.services.router.registry import NodeRegistry
from fedllm.services.router.strategies import build_strategy
from fedllm.services.router.strategy import BatchRoutingStrategy, RoutingStrategy

log = logging.getLogger(__name__)

POLL_MS = 200


class _Assigned(ConsumerRebalanceListener):
    """Sets `event` once the group has given this member its (possibly empty) assignment."""

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.event.set()


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of `topic` to a group-less consumer."""
    await consumer.topics()  # refresh metadata
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise RuntimeError(f"topic {topic} does not exist; run `fedllm topics` first")
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    return tps


class RouterService:
    """Owns the clients and the dispatcher; `run()` is the service's lifetime."""

    def __init__(
        self,
        settings: Settings,
        *,
        strategy: RoutingStrategy | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.dispatcher = Dispatcher(
            registry=NodeRegistry(ttl_s=settings.node_ttl_s),
            strategy=strategy or build_strategy(settings.router_strategy),
            node_timeout_s=settings.node_timeout_s,
            hedge=settings.router_hedge,
        )
        self.metrics = metrics or process_metrics(hospitals=[h.id for h in settings.hospitals])
        self.batch_window_ms = (
            settings.router_batch_window_ms
            if isinstance(self.dispatcher.strategy, BatchRoutingStrategy)
            else 0
        )
        self.producer = make_producer(settings)
        self.bus = Bus(self.producer)
        self.decisions = make_consumer(settings, group_id=SERVICE)
        self.heartbeats = make_consumer(settings, group_id=None)
        self.node_results = make_consumer(settings, group_id=None)
        self._assigned = asyncio.Event()
        self.traces = tracing.TraceMemory()
        self.policy = RetryPolicy.from_settings(settings)
        self.tick_s = max(0.02, min(0.25, settings.node_ttl_s / 10, settings.node_timeout_s / 10))

    async def execute(self, actions: list[Action]) -> None:
        """Send messages first, then their audit events."""
        for action in actions:
            if isinstance(action, Send):
                try:
                    with self.traces.resume(action.record.get("request_id"), "router dispatch"):
                        await self.bus.send(
                            action.topic, action.schema, action.record, key=action.key
                        )
                except KafkaError as exc:
                    if action.schema != "RoutedRequest":
                        raise  # a failure result must not be lost: crash, replay on restart
                    log.warning("cannot send to %s: %r", action.topic, exc)
                    await self.execute(
                        self.dispatcher.on_send_failed(
                            action.record["request_id"],
                            action.record["hospital_id"],
                            now_ms=now_ms(),
                        )
                    )
        for action in actions:
            if isinstance(action, Audit):
                self.metrics.observe(action, strategy=self.dispatcher.strategy.name)
                with self.traces.resume(action.fields.get("request_id"), "router audit"):
                    await audit.emit(
                        self.bus,
                        action=action.action,
                        service=SERVICE,
                        id_parts=action.id_parts,
                        **action.fields,
                    )

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        await wait_for_broker(self.settings)
        await self.producer.start()
        for consumer in (self.decisions, self.heartbeats, self.node_results):
            await consumer.start()
        self.decisions.subscribe([topics.DECISIONS], listener=_Assigned(self._assigned))
        hb_tps = await _assign_all(self.heartbeats, topics.HEARTBEATS)
        await seek_to_time(self.heartbeats, hb_tps, now_ms() - int(self.settings.node_ttl_s * 1000))
        nr_tps = await _assign_all(self.node_results, topics.NODE_RESULTS)
        await self.node_results.seek_to_end(*nr_tps)
        for tp in nr_tps:  # resolve now, so no answer to a request we route can be skipped
            await self.node_results.position(tp)
        await self._drain_heartbeats()

    async def _drain_heartbeats(self) -> None:
        """Read the recent heartbeats before routing anything, so the registry is warm."""
        while True:
            batch = await self.heartbeats.getmany(timeout_ms=50)
            if not batch:
                return
            await self._on_heartbeats(batch)

    async def stop(self) -> None:
        for consumer in (self.decisions, self.heartbeats, self.node_results):
            with contextlib.suppress(Exception):
                await consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()

    # -- loops ----------------------------------------------------------------------------

    async def _on_heartbeats(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for msgs in batch.values():
            for msg in msgs:
                hb = await self.bus.decode_or_dead_letter(msg, "NodeHeartbeat", service=SERVICE)
                if hb is not None:
                    await self.execute(self.dispatcher.on_heartbeat(hb, now_ms=now_ms()))

    async def route_decisions(self) -> None:
        while True:
            batch = await self.decisions.getmany(timeout_ms=POLL_MS)
            metrics.record_lag(SERVICE, self.decisions, batch)
            if batch and self.batch_window_ms > 0:  # let the window fill, then place jointly
                await asyncio.sleep(self.batch_window_ms / 1000)
                for tp, msgs in (await self.decisions.getmany(timeout_ms=0)).items():
                    batch.setdefault(tp, []).extend(msgs)
            decisions = []
            for msgs in batch.values():
                for msg in msgs:
                    decision = await self.bus.decode_or_dead_letter(
                        msg, "BudgetDecision", service=SERVICE
                    )
                    if decision is not None:
                        with metrics.stage(
                            SERVICE,
                            "BudgetDecision",
                            headers=msg.headers,
                            request_id=decision["request_id"],
                        ):
                            self.traces.remember(decision["request_id"])  # for batched sends
                        decisions.append((msg, decision))
            if decisions:
                await self.route_batch(decisions)
            if batch:
                await self.decisions.commit()

    async def fail_decision(self, decision: dict[str, Any], reason: str) -> None:
        """Terminal verdict for a decision that could not be routed (dead-lettered): a failure
        result on node-results, on which the accountant refunds the reservation."""
        if not decision["approved"]:
            return
        request = decision["request"]
        await self.bus.send(
            topics.NODE_RESULTS,
            "InferenceResult",
            {
                "request_id": request["request_id"],
                "user_id": request["user_id"],
                "department": request["department"],
                "status": "failed",
                "reason": reason,
                "node_id": "",
                "attempt": 0,
                "delta": decision["delta"],
                "finished_at_ms": now_ms(),
            },
            key=request["user_id"],
        )

    async def route_one(self, decision: dict[str, Any]) -> None:
        await self.execute(self.dispatcher.on_decision(decision, now_ms=now_ms()))

    async def route_batch(self, decisions: list[tuple[ConsumerRecord, dict[str, Any]]]) -> None:
        """Place a batch jointly; if that fails, deliver each decision on its own (retries,
        then a failure verdict and the DLQ)."""
        try:
            await self.execute(
                self.dispatcher.on_decisions([d for _, d in decisions], now_ms=now_ms())
            )
            return
        except Exception:
            log.exception("routing a batch of %d decisions failed; one by one", len(decisions))
        for msg, decision in decisions:
            await deliver(
                msg,
                functools.partial(self.route_one, decision),
                bus=self.bus,
                service=SERVICE,
                policy=self.policy,
                on_dead=functools.partial(self.fail_decision, decision),
            )

    async def track_nodes(self) -> None:
        while True:
            await self._on_heartbeats(await self.heartbeats.getmany(timeout_ms=POLL_MS))

    async def close_answered(self) -> None:
        while True:
            batch = await self.node_results.getmany(timeout_ms=POLL_MS)
            for msgs in batch.values():
                for msg in msgs:
                    result = await self.bus.decode_or_dead_letter(
                        msg, "InferenceResult", service=SERVICE
                    )
                    if result is not None:
                        with metrics.stage(
                            SERVICE,
                            "InferenceResult",
                            headers=msg.headers,
                            request_id=result["request_id"],
                        ):
                            await self.execute(
                                self.dispatcher.on_node_result(result, now_ms=now_ms())
                            )

    async def supervise(self) -> None:
        while True:
            await self.execute(self.dispatcher.tick(now_ms=now_ms()))
            await asyncio.sleep(self.tick_s)

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, run every loop until `stop` is set (or one fails), then close the clients."""
        clear_ready(self.settings, SERVICE)
        try:
            await self.start()
            await _until_stopped(
                stop,
                [
                    self.route_decisions,
                    self.track_nodes,
                    self.close_answered,
                    self.supervise,
                    self.announce_ready,
                ],
            )
        finally:
            clear_ready(self.settings, SERVICE)
            await self.stop()

    async def announce_ready(self) -> None:
        await self._assigned.wait()
        mark_ready(self.settings, SERVICE)
        log.info("router ready: %d nodes alive", len(self.dispatcher.registry.alive(now_ms())))


async def _until_stopped(
    stop: asyncio.Event, loops: list[Callable[[], Coroutine[Any, Any, None]]]
) -> None:
    """Run `loops` until `stop` is set or one of them fails (then re-raise its error)."""
    tasks = {asyncio.create_task(loop()) for loop in loops}
    stopper = asyncio.create_task(stop.wait())
    pending: set[asyncio.Task[None] | asyncio.Task[bool]] = {stopper, *tasks}
    try:
        while stopper in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:  # a loop that returns normally (announce_ready) is just done
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def run(
    settings: Settings, *, stop: asyncio.Event, strategy: RoutingStrategy | None = None
) -> None:
    """Run the router until `stop` is set."""
    await RouterService(settings, strategy=strategy).serve(stop)

"""The router's Kafka loop (thin): feeds the pure `Dispatcher` and carries out its actions.

Consumers:
- `fedllm.decisions` in group "router"; offsets are committed after the batch's actions are sent.
  With a batch strategy (the assignment optimiser) a batch is what arrives within
  `router_batch_window_ms` of its first decision, placed jointly.
- `fedllm.heartbeats` and `fedllm.node-results`, all partitions by `assign()` without a group
  (every router instance needs every heartbeat and every answer). Heartbeats are read
  from `node_ttl_s` ago, node results from the end. In-flight and fan-out state lives in memory;
  supervision goes with the decisions partitions: a member that is assigned some re-derives it
  before routing anything (`services/router/recovery.py`: the RoutedRequests tagged with this
  deployment's `router_id` and the node results of the last `request_timeout_s`; live answers
  wait meanwhile), and one that loses them drops it. A decision replayed by the group is
  recognised as in flight; the accountant keeps node results first-wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from fedllm.common import audit, control, metrics, results, topics, tracing
from fedllm.common.config import Settings
from fedllm.common.delivery import RetryPolicy, deliver
from fedllm.common.kafka import (
    Bus,
    assign_all,
    make_consumer,
    make_producer,
    now_ms,
    partitions_of,
    seek_all,
    seek_to_time,
    wait_for_broker,
)
from fedllm.common.lifecycle import clear_ready, mark_ready
from fedllm.common.residency import RegionPolicy
from fedllm.schemas.records import (
    BudgetDecision,
    ControlCommand,
    InferenceResult,
    NodeHeartbeat,
    RoutedRequest,
)
from fedllm.services.router import recovery
from fedllm.services.router.admission import ControlledRegistry
from fedllm.services.router.dispatcher import SERVICE, Action, Audit, Dispatcher, Send
from fedllm.services.router.metrics import RouterMetrics, process_metrics
from fedllm.services.router.strategies import build_strategy
from fedllm.services.router.strategy import BatchRoutingStrategy, RoutingStrategy

log = logging.getLogger(__name__)

POLL_MS = 200
RECOVERY_MARGIN_MS = 5_000  # read routed requests and answers this far before the oldest live one


class _Assigned(ConsumerRebalanceListener):
    """Hands supervision over with the decisions partitions: a member that gets some re-adopts
    what was in flight (from the topics) before it routes anything; one that loses them drops
    its state (the new owner adopts it). Sets `event` once the first assignment is in."""

    def __init__(self, service: RouterService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.service.recovered.clear()
            self.service.dispatcher.in_flight.clear()
            self.service.dispatcher.fan_outs.clear()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if assigned:
            try:
                await self.service.recover()
            except Exception as exc:  # the group swallows listener errors: fail the router
                log.exception("re-adopting the in-flight requests failed")
                self.service.recovery_error = exc
        self.service.recovered.set()
        self.service._assigned.set()


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
        self.control = control.ControlFollower(settings, on_command=self.on_control)
        self.registry = ControlledRegistry(ttl_s=settings.node_ttl_s, control=self.control.state)
        self.dispatcher = Dispatcher(
            registry=self.registry,
            strategy=strategy or build_strategy(settings.router_strategy),
            node_timeout_s=settings.node_timeout_s,
            hedge=settings.router_hedge,
            regions=RegionPolicy.from_settings(settings),
            consensus_k=settings.consensus_k,
            population={h.id: h.population for h in settings.hospitals},
        )
        self.metrics = metrics or process_metrics(hospitals=[h.id for h in settings.hospitals])
        self.batch_window_ms = (
            settings.router_batch_window_ms
            if isinstance(self.dispatcher.strategy, BatchRoutingStrategy)
            else 0
        )
        self.producer = make_producer(settings)
        self.bus = Bus(self.producer, settings.topic_namespace)
        self.decisions = make_consumer(settings, group_id=SERVICE)
        self.heartbeats = make_consumer(
            settings, group_id=None, fetch_max_wait_ms=settings.background_fetch_max_wait_ms
        )
        self.node_results = make_consumer(settings, group_id=None)
        self._assigned = asyncio.Event()
        self.traces = tracing.TraceMemory()
        self.policy = RetryPolicy.from_settings(settings)
        self._tag = [(recovery.ROUTER_HEADER, settings.router_id.encode())]
        self.restored = 0  # requests re-adopted on assignments so far (recovery.py)
        self.recovery_error: Exception | None = None
        # Fetching starts before the assignment listener has re-adopted the in-flight state:
        # decisions wait for it, so none is routed twice.
        self.recovered = asyncio.Event()
        self._answers = asyncio.Lock()  # live node results wait while state is re-adopted
        self.tick_s = max(0.02, min(0.25, settings.node_ttl_s / 10, settings.node_timeout_s / 10))

    def on_control(self, record: ControlCommand) -> None:
        """A control command folded in: apply a new routing strategy."""
        if record["action"] == "config_set" and record["target"] == "router_strategy":
            name = self.control.state.setting("router_strategy") or self.settings.router_strategy
            self.dispatcher.strategy = build_strategy(name)
            self.batch_window_ms = (
                self.settings.router_batch_window_ms
                if isinstance(self.dispatcher.strategy, BatchRoutingStrategy)
                else 0
            )
            log.info("routing strategy now %s", name)

    def control_audits(self) -> list[Action]:
        """Audit events for ignored heartbeats and automatic breakers."""
        return [
            Audit(
                e.action,
                (e.hospital_id, e.action, now_ms()),
                {"hospital_id": e.hospital_id, **e.fields},
            )
            for e in self.registry.drain_events()
        ]

    async def execute(self, actions: list[Action]) -> None:
        """Send messages first, then their audit events."""
        actions = actions + self.control_audits()
        for action in actions:
            if isinstance(action, Send):
                try:
                    with self.traces.resume(action.record.get("request_id"), "router dispatch"):
                        await self.bus.send(
                            action.topic,
                            action.schema,
                            action.record,
                            key=action.key,
                            headers=self._tag if action.schema == "RoutedRequest" else None,
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
        await self.control.start()  # the control log first: admission gates the heartbeats
        await self.producer.start()
        for consumer in (self.decisions, self.heartbeats, self.node_results):
            await consumer.start()
        scoped = functools.partial(topics.scoped, self.settings)
        self.decisions.subscribe([scoped(topics.DECISIONS)], listener=_Assigned(self))
        hb_tps = await assign_all(self.heartbeats, scoped(topics.HEARTBEATS))
        await seek_to_time(self.heartbeats, hb_tps, now_ms() - int(self.settings.node_ttl_s * 1000))
        nr_tps = await assign_all(self.node_results, scoped(topics.NODE_RESULTS))
        # resolved now, so no answer to a request we route can be skipped
        await seek_all(self.node_results, nr_tps, to_end=True)
        await self._drain_heartbeats()

    async def recover(self) -> None:
        """Re-adopt what this deployment's routers were supervising (from the topics) before
        routing anything; live node results wait meanwhile, so none falls in a gap."""
        async with self._answers:
            since = now_ms() - int(self.settings.request_timeout_s * 1000) - RECOVERY_MARGIN_MS
            hospitals = {h.id for h in self.settings.hospitals}
            hospitals |= {n.hospital_id for n in self.dispatcher.registry.alive(now_ms())}
            reader = make_consumer(self.settings, group_id=None)
            await reader.start()
            try:
                scoped = functools.partial(topics.scoped, self.settings)
                wanted = [scoped(topics.hospital_requests(h)) for h in sorted(hospitals)]
                tps = await partitions_of(reader, wanted, missing_ok=True)
                nr_tps = await partitions_of(reader, scoped(topics.NODE_RESULTS), missing_ok=True)
                reader.assign(tps + nr_tps)
                routed = await recovery.read_since(
                    reader, tps, since, RoutedRequest, router_id=self.settings.router_id
                )
                answers = await recovery.read_since(reader, nr_tps, since, InferenceResult)
            finally:
                with contextlib.suppress(Exception):
                    await reader.stop()
            self.restored += recovery.restore(self.dispatcher, routed, now_ms=now_ms())
            actions = recovery.replay_results(self.dispatcher, answers, now_ms=now_ms())
            await self.execute(actions)
        if self.restored:
            log.info(
                "router %s re-adopted %d requests (%d still open) from the topics",
                self.settings.router_id,
                self.restored,
                len(self.dispatcher.in_flight) + len(self.dispatcher.fan_outs),
            )

    async def _drain_heartbeats(self) -> None:
        """Read the recent heartbeats before routing anything, so the registry is warm. Bounded
        in time: live nodes keep sending, so "until a fetch comes back empty" may never end."""
        deadline = time.monotonic() + max(1.0, self.settings.node_ttl_s)
        while time.monotonic() < deadline:
            batch = await self.heartbeats.getmany(
                timeout_ms=2 * self.settings.background_fetch_max_wait_ms
            )
            if not batch:
                return
            await self._on_heartbeats(batch)

    async def stop(self) -> None:
        await self.control.stop()
        for consumer in (self.decisions, self.heartbeats, self.node_results):
            with contextlib.suppress(Exception):
                await consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()

    # -- loops ----------------------------------------------------------------------------

    async def _on_heartbeats(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        for msgs in batch.values():
            for msg in msgs:
                hb = await self.bus.decode_or_dead_letter(msg, NodeHeartbeat, service=SERVICE)
                if hb is not None:
                    await self.execute(self.dispatcher.on_heartbeat(hb, now_ms=now_ms()))

    async def route_decisions(self) -> None:
        while True:
            batch = await self.decisions.getmany(timeout_ms=POLL_MS)
            if batch:
                await self.recovered.wait()
            if self.recovery_error is not None:
                raise self.recovery_error  # crash before routing: the supervisor restarts us
            metrics.record_lag(SERVICE, self.decisions, batch)
            if self.batch_window_ms > 0 and (
                sum(map(len, batch.values())) >= self.settings.router_batch_min
            ):  # under load: let the window fill, then place jointly
                await asyncio.sleep(self.batch_window_ms / 1000)
                for tp, msgs in (await self.decisions.getmany(timeout_ms=0)).items():
                    batch.setdefault(tp, []).extend(msgs)
            decisions = []
            for msgs in batch.values():
                for msg in msgs:
                    decision = await self.bus.decode_or_dead_letter(
                        msg, BudgetDecision, service=SERVICE
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

    async def fail_decision(self, decision: BudgetDecision, reason: str) -> None:
        """Terminal verdict for a decision that could not be routed (dead-lettered): a failure
        result on node-results, on which the accountant refunds the reservation."""
        if not decision["approved"]:
            return
        request = decision["request"]
        result: InferenceResult = {
            "request_id": request["request_id"],
            "user_id": request["user_id"],
            "department": request["department"],
            "status": "failed",
            "reason": reason,
            "node_id": "",
            "attempt": 0,
            "delta": decision["delta"],
            "finished_at_ms": now_ms(),
            "kind": results.VERDICT,
        }
        await self.bus.send(topics.NODE_RESULTS, "InferenceResult", result, key=request["user_id"])

    async def route_one(self, decision: BudgetDecision) -> None:
        await self.execute(self.dispatcher.on_decision(decision, now_ms=now_ms()))

    async def route_batch(self, decisions: list[tuple[ConsumerRecord, BudgetDecision]]) -> None:
        """Place a batch jointly; if that fails, deliver each decision on its own (retries,
        then a failure verdict and the DLQ). While processing is halted, each approved decision
        ends failed before any node sees it (the accountant refunds it)."""
        if self.control.state.halted is not None:
            for _, decision in decisions:
                await self.fail_decision(
                    decision, f"processing halted: {self.control.state.halted}"
                )
            return
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
            async with self._answers:
                for msgs in batch.values():
                    for msg in msgs:
                        await self._on_answer(msg)

    async def _on_answer(self, msg: ConsumerRecord) -> None:
        result = await self.bus.decode_or_dead_letter(msg, InferenceResult, service=SERVICE)
        if result is not None:
            with metrics.stage(
                SERVICE, "InferenceResult", headers=msg.headers, request_id=result["request_id"]
            ):
                await self.execute(self.dispatcher.on_node_result(result, now_ms=now_ms()))

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

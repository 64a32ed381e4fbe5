"""The node worker's Kafka loop: one process per hospital.

Consumes RoutedRequests from ``hospital.<id>.requests`` (group ``node-<id>``), answers each with
:class:`~fedllm.services.node_worker.answering.Engine` in a worker thread, produces exactly one
InferenceResult per request to ``fedllm.node-results`` (key user_id), audits it, and only then
commits the offset (at-least-once). Heartbeats flow on their own task throughout, including
while the model loads and while a request is being decoded.

Replays: every result is persisted per (request_id, attempt) in the hospital's own store
(:mod:`fedllm.services.node_worker.ledger`) **before** it is published, so a redelivered request — even
after a restart — gets exactly the release already made and never triggers a second draw.

Nothing timing-related or record-dependent leaves the node: ``model_time_ms`` and
``processing_time_ms`` are 0, ``records_used`` is 0, heartbeats report no latency.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from fedllm.common import audit, codec, control, grants, metrics, results, topics
from fedllm.common.config import Settings
from fedllm.common.delivery import RetryPolicy, deliver
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms, wait_for_broker
from fedllm.common.lifecycle import clear_ready, mark_ready
from fedllm.schemas.records import InferenceResult, NodeHeartbeat, RoutedRequest
from fedllm.services.node_worker.fields import ENGINE_FIELDS, AnswerFields, failed
from fedllm.services.node_worker.health import NodeHealth, budget_room_level
from fedllm.services.node_worker.intake import IntakeQueue, priority_of
from fedllm.services.node_worker.ledger import NodeLedger

log = logging.getLogger(__name__)

SERVICE = "node_worker"
_REPLAY_CACHE = 1024


class EngineLike(Protocol):  # pragma: no cover - structural type for the factory's product
    model_name: str
    device: str

    def answer_batch(self, requests: Sequence[RoutedRequest]) -> list[AnswerFields]: ...


EngineFactory = Callable[[Settings, str], Any]


def default_engine_factory(settings: Settings, hospital_id: str) -> Any:
    from fedllm.services.node_worker.answering import Engine

    return Engine(settings, hospital_id, groups=settings.dp_groups)


@dataclass(slots=True)
class NodeState:
    """What the heartbeat reports."""

    engine: Any = None
    load_error: str = ""
    queue_depth: int = 0
    in_flight: int = 0
    health: NodeHealth = field(default_factory=NodeHealth)

    @property
    def healthy(self) -> bool:
        return self.engine is not None and not self.load_error

    def recent_latency_ms(self) -> float:
        """Always 0: a node's latency depends on its records (issue #11), so it is not sent."""
        return 0.0


def heartbeat_record(settings: Settings, hospital_id: str, state: NodeState) -> NodeHeartbeat:
    engine = state.engine
    return {
        "hospital_id": hospital_id,
        "departments": list(settings.hospital(hospital_id).departments),
        "queue_depth": state.queue_depth,
        "in_flight": state.in_flight,
        "recent_latency_ms": state.recent_latency_ms(),
        "model": getattr(engine, "model_name", "") if engine is not None else "loading",
        "device": getattr(engine, "device", "cpu") if engine is not None else "cpu",
        "healthy": state.healthy,
        "sent_at_ms": now_ms(),
        "queue_by_priority": state.health.queue_by_priority(),
        "ewma_latency_ms": state.health.ewma_latency_ms,
        "error_rate": state.health.error_rate,
        "budget_room": budget_room_level(_budget_room(engine)),
        "data_version": settings.hospital(hospital_id).data_version,
    }


def _budget_room(engine: Any) -> float | None:
    """The fraction of the hospital's data-set budget left, if its engine keeps a ledger
    (an optional ``budget_room() -> float | None`` method); None otherwise or on error."""
    room = getattr(engine, "budget_room", None)
    if not callable(room):
        return None
    try:
        value = room()
    except Exception:
        log.exception("budget room unavailable")
        return None
    return None if value is None else float(value)


def result_record(
    routed: RoutedRequest, fields: AnswerFields, *, hospital_id: str, started_ms: int = 0
) -> InferenceResult:
    """An InferenceResult for ``routed`` from the engine's fields (unknown keys dropped)."""
    inner = routed.get("request") or {}
    finished = now_ms()
    rec: InferenceResult = {
        "request_id": routed["request_id"],
        "user_id": inner.get("user_id", ""),
        "department": inner.get("department", ""),
        "status": "failed",
        "reason": "",
        "response": "",
        "node_id": hospital_id,
        "attempt": int(routed.get("attempt", 0)),
        "is_private": False,
        "privacy_cost": 0.0,
        "delta": float(routed.get("delta", 0.0)),
        "rdp_orders": [],
        "rdp_epsilons": [],
        "remaining_budget": -1.0,
        "tokens": 0,
        "records_used": 0,  # never leaves the node
        "model_time_ms": 0.0,  # timings depend on the records: never sent
        "processing_time_ms": 0.0,
        "finished_at_ms": finished,
        "aggregate_json": "",
        "adapter_hash": "",
        "adapter_epsilon": 0.0,
        # What this record is follows from what was asked, never from the answer's fields.
        "kind": results.PART if int(routed.get("parts") or 1) > 1 else results.ANSWER,
    }
    for k in ENGINE_FIELDS:
        if k in fields:
            rec[k] = fields[k]
    rec["reason"] = str(rec["reason"])[:1000]
    return rec


@dataclass(slots=True)
class _Pending:
    """A request being handled: its fields once known (None: still to answer)."""

    routed: RoutedRequest
    priority: str
    fields: AnswerFields | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.routed["request_id"], int(self.routed.get("attempt", 0)))


class NodeWorker:
    """The per-request handling, separate from the consume loop so tests can drive it."""

    def __init__(self, settings: Settings, hospital_id: str, bus: Bus, state: NodeState) -> None:
        self.settings = settings
        self.hospital_id = hospital_id
        self.bus = bus
        self.state = state
        self.grant_key = grants.verify_key(settings)  # fail fast on a missing key
        self._answered: collections.OrderedDict[tuple[str, int], AnswerFields] = (
            collections.OrderedDict()
        )
        # Why processing is halted (fedllm.control), or None: queued work then ends failed
        # before any mechanism starts, so the accountant refunds it.
        self.halted: Callable[[], str | None] = lambda: None

    async def handle(self, msg: ConsumerRecord) -> None:
        """Decode, answer and publish one message; never leaves a request without a result."""
        await self.handle_batch([msg])

    async def handle_batch(self, msgs: Sequence[ConsumerRecord]) -> None:
        """Decode, answer and publish messages, in order: their ledger reads, draws and
        releases each take one transaction for the whole batch (one thread hop), every release
        is stored before any result is published, and each request gets exactly one result."""
        started = now_ms()
        todo: list[_Pending] = []
        for msg in msgs:
            routed = await self.bus.decode_or_dead_letter(msg, RoutedRequest, service=SERVICE)
            if routed is None:
                continue
            priority = str((routed.get("request") or {}).get("priority", "normal"))
            self.state.health.received(priority)
            pending = _Pending(routed, priority)
            refusal = grants.grant_refusal(self.grant_key, routed, self.hospital_id)
            if refusal:  # no reservation the accountant signed for this node: no release
                log.warning("refused routed request %s: %s", routed["request_id"], refusal)
                pending.fields = failed(f"refused: {refusal}")
                await self._refused(routed, refusal)
            todo.append(pending)
        ask = [p for p in todo if p.fields is None]
        if ask:
            self.state.in_flight += len(ask)
            try:
                with metrics.model_time(self.hospital_id):
                    await asyncio.to_thread(self._settle, ask, started)
            finally:
                self.state.in_flight -= len(ask)
        records = await asyncio.gather(
            *(
                self._publish(
                    p.routed, result_record(p.routed, p.fields or {}, hospital_id=self.hospital_id)
                )
                for p in todo
            )
        )
        done = list(zip(todo, records, strict=True))
        for p, record in done:
            # Wall time as the router sees it anyway; results themselves carry no timings.
            self.state.health.answered(
                p.priority,
                latency_ms=float(now_ms() - started),
                ok=record["status"] in ("ok", "partial"),
            )
        await asyncio.gather(*(self._audit(p.routed, record) for p, record in done))
        await refresh_adapter(self.state.engine)

    def _settle(self, todo: list[_Pending], started: int) -> None:
        """In a worker thread: each request's fields — its stored release (a replay), a failure
        before any mechanism, or the engine's answer — stored before anything is published."""
        engine = self.state.engine
        ledger: NodeLedger | None = getattr(engine, "ledger", None)
        with ledger.transaction() if ledger is not None else contextlib.nullcontext():
            for p in todo:
                stored = ledger.lookup(*p.key) if ledger is not None else None
                if stored is not None and stored.state == "released":
                    p.fields = stored.fields
                p.fields = p.fields if p.fields is not None else self._answered.get(p.key)
                if p.fields is not None:
                    log.info("replayed request %s attempt %d: re-sending its release", *p.key)
                elif (halt := self.halted()) is not None:
                    p.fields = failed(f"processing halted: {halt}")
                elif 0 < p.routed.get("deadline_ms", 0) < started:
                    p.fields = failed("deadline passed before start")
        ask = [p for p in todo if p.fields is None]
        if not ask:
            return
        answers = self._answer([p.routed for p in ask])
        with ledger.transaction() if ledger is not None else contextlib.nullcontext():
            for p, answered in zip(ask, answers, strict=True):
                if ledger is not None:  # persist before publishing; the stored copy goes out
                    answered = ledger.release(*p.key, answered)
                p.fields = answered
        for p in ask:
            assert p.fields is not None
            self._answered[p.key] = p.fields
        while len(self._answered) > _REPLAY_CACHE:
            self._answered.popitem(last=False)

    def _answer(self, requests: list[RoutedRequest]) -> list[AnswerFields]:
        engine = self.state.engine
        if engine is None:
            reason = f"node not ready: {self.state.load_error or 'model loading'}"
            return [failed(reason) for _ in requests]
        try:
            answers: list[AnswerFields] = engine.answer_batch(requests)
            return answers
        except Exception:  # one bad batch must not kill the node; the text stays in the log
            log.exception("requests %s failed", [r.get("request_id") for r in requests])
            return [failed("internal error; nothing released") for _ in requests]

    async def _publish(self, routed: RoutedRequest, record: InferenceResult) -> InferenceResult:
        """Send ``record``; one the schema refuses is replaced by a failure. Returns what went."""
        try:
            await self.bus.send(
                topics.NODE_RESULTS, "InferenceResult", record, key=record["user_id"] or None
            )
            return record
        except ValueError as exc:  # the engine returned something the schema refuses
            log.error("result for %s does not encode: %s", record["request_id"], exc)
        record = result_record(
            routed, failed("internal error: unencodable result"), hospital_id=self.hospital_id
        )
        await self.bus.send(
            topics.NODE_RESULTS, "InferenceResult", record, key=record["user_id"] or None
        )
        return record

    async def fail(self, msg: ConsumerRecord, reason: str) -> None:
        """Terminal outcome of a request that could not be handled (dead-lettered): a failed
        result for the router to retry elsewhere or fail (nothing was released)."""
        routed = codec.decode_as(RoutedRequest, msg.value, msg.headers)
        record = result_record(
            routed, failed(reason), hospital_id=self.hospital_id, started_ms=now_ms()
        )
        await self.bus.send(
            topics.NODE_RESULTS, "InferenceResult", record, key=record["user_id"] or None
        )

    async def _refused(self, routed: RoutedRequest, reason: str) -> None:
        inner = routed.get("request") or {}
        try:
            await audit.emit(
                self.bus,
                action="node.grant_refused",
                service=SERVICE,
                severity="security",
                id_parts=(routed["request_id"], routed.get("attempt", 0), self.hospital_id),
                request_id=routed["request_id"],
                user_id=inner.get("user_id", ""),
                department=inner.get("department", ""),
                hospital_id=self.hospital_id,
                outcome="refused",
                reason=reason,
            )
        except Exception:
            log.exception("audit event for %s not sent", routed["request_id"])

    async def _audit(self, routed: RoutedRequest, record: InferenceResult) -> None:
        inner = routed.get("request") or {}
        ok = record["status"] in ("ok", "partial")  # a part of a fan-out is a DP release too
        summary = (
            json.dumps({"orders": record["rdp_orders"], "values": record["rdp_epsilons"]})
            if record["rdp_orders"]
            else ""
        )
        try:
            await audit.emit(
                self.bus,
                action="node.answered" if ok else "node.failed",
                service=SERVICE,
                id_parts=(routed["request_id"], record["attempt"], self.hospital_id),
                request_id=routed["request_id"],
                user_id=inner.get("user_id", ""),
                role=inner.get("role", ""),
                department=inner.get("department", ""),
                hospital_id=self.hospital_id,
                records_used=0,  # never leaves the node
                epsilon=float(record["privacy_cost"]),
                delta=float(record["delta"]),
                rdp_summary=summary,
                outcome=record["status"],
                reason=record["reason"],
                attempt=str(record["attempt"]),
                tokens=str(record["tokens"]),
            )
        except Exception:
            log.exception("audit event for %s not sent", routed["request_id"])


async def _heartbeats(
    settings: Settings, hospital_id: str, bus: Bus, state: NodeState, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        try:
            await bus.send(
                topics.HEARTBEATS,
                "NodeHeartbeat",
                heartbeat_record(settings, hospital_id, state),
                key=hospital_id,
            )
        except Exception as exc:
            log.warning("heartbeat not sent: %r", exc)
        balance = getattr(state.engine, "budget_balance", None)
        if callable(balance):  # the hospital gauges behind the "hospital budget low" alert
            with contextlib.suppress(Exception):
                limit, remaining = balance()
                metrics.record_budget("hospital", hospital_id, limit=limit, remaining=remaining)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.heartbeat_interval_s)


async def refresh_adapter(engine: Any, *, force: bool = False) -> None:
    """Between requests: load a newly approved adapter (rate-limited inside; one small read)."""
    adapters = getattr(engine, "adapters", None)
    if adapters is None:
        return
    try:
        await asyncio.to_thread(adapters.refresh, force=force)
    except Exception:  # the node keeps serving; adapter requests fail until it loads
        log.exception("adapter refresh failed")


async def _load_engine(
    factory: EngineFactory, settings: Settings, hospital_id: str, state: NodeState
) -> None:
    try:
        state.engine = await asyncio.to_thread(factory, settings, hospital_id)
        await refresh_adapter(state.engine, force=True)
    except Exception as exc:
        log.exception("engine failed to load")
        state.load_error = f"{type(exc).__name__}: {exc}"


async def run(
    settings: Settings,
    hospital_id: str,
    *,
    stop: asyncio.Event,
    engine_factory: EngineFactory | None = None,
) -> None:
    """Serve ``hospital_id`` until ``stop`` is set."""
    settings.hospital(hospital_id)  # unknown hospital: fail fast
    grants.verify_key(settings)  # no key to check reservation grants with: fail fast
    ready_name = f"node-{hospital_id}"
    clear_ready(settings, ready_name)
    await wait_for_broker(settings)
    state = NodeState()
    producer = make_producer(settings)
    await producer.start()
    bus = Bus(producer, settings.topic_namespace)
    consumer = make_consumer(
        settings,
        topics.hospital_requests(hospital_id),
        group_id=f"node-{hospital_id}",
        max_poll_records=8,
        # Model work between polls may be long: stay in the group (aiokafka's default, 5 min,
        # evicted a node with a few long generations queued).
        max_poll_interval_ms=int(settings.node_max_poll_interval_s * 1000),
    )
    heartbeat_task = asyncio.create_task(_heartbeats(settings, hospital_id, bus, state, stop))
    load_task = asyncio.create_task(
        _load_engine(engine_factory or default_engine_factory, settings, hospital_id, state)
    )
    worker = NodeWorker(settings, hospital_id, bus, state)
    follower = control.ControlFollower(settings)
    await follower.start()
    worker.halted = lambda: follower.state.halted
    policy = RetryPolicy.from_settings(settings)
    answered: dict[TopicPartition, int] = {}  # committable offsets, committed when idle
    try:
        await consumer.start()
        # Join the group only after the engine is up, so no request waits on a loading model.
        while not load_task.done() and not stop.is_set():
            await asyncio.wait({load_task}, timeout=0.2)
        ready = False
        intake: IntakeQueue[_Fetched] = IntakeQueue()
        since_commit = 0
        capacity = max(1, settings.node_intake_capacity)
        while not stop.is_set():
            room = capacity - len(intake)
            if room > 0:  # keep polling (group membership) but fetch only what fits
                consumer.resume(*consumer.assignment())
            else:
                consumer.pause(*consumer.assignment())
            batches = await consumer.getmany(
                timeout_ms=0 if len(intake) else 200, max_records=max(1, room)
            )
            metrics.record_lag(ready_name, consumer, batches)
            if not ready and consumer.assignment() and state.healthy:
                mark_ready(settings, ready_name)
                ready = True
                log.info("node %s ready: %s", hospital_id, sorted(consumer.assignment()))
            for tp, msgs in batches.items():
                for msg in msgs:
                    priority, aggregate = _peek(msg)
                    intake.push(tp, msg.offset, priority, _Fetched(msg, aggregate))
            gone = intake.queued_partitions() - set(consumer.assignment())
            if gone:  # rebalanced away: their new owner answers them
                log.info("dropped %d queued requests of revoked partitions", intake.drop(gone))
            if not len(intake):
                await _commit(consumer, answered)  # one commit per drained queue
                answered.clear()
                since_commit = 0
                state.queue_depth = 0
                metrics.record_node_queue(hospital_id, 0)
                continue
            taken = [intake.pop()]
            while (  # aggregate queries in a row are answered as one batch
                taken[0].item.aggregate
                and len(taken) < settings.node_batch_max
                and len(intake)
                and intake.peek().item.aggregate
            ):
                taken.append(intake.pop())
            msgs = [q.item.msg for q in taken]
            state.queue_depth = len(intake)  # fetched and waiting behind these
            metrics.record_node_queue(hospital_id, len(intake))
            with metrics.stage(
                "node_worker",
                "RoutedRequest",
                headers=msgs[0].headers,
                request_id=(msgs[0].key or b"").decode(errors="replace"),
                messages=len(msgs),
            ):
                await _deliver_batch(msgs, worker, bus=bus, policy=policy, stop=stop)
            for q in taken:
                offset = intake.done(q.partition, q.offset)
                if offset is not None:
                    answered[q.partition] = offset
            since_commit += len(taken)
            if since_commit >= capacity:  # under steady load, at least every `capacity` answers
                await _commit(consumer, answered)
                answered.clear()
                since_commit = 0
    finally:
        clear_ready(settings, ready_name)
        stop.set()
        load_task.cancel()
        await asyncio.gather(heartbeat_task, load_task, return_exceptions=True)
        await follower.stop()
        with contextlib.suppress(Exception):
            await _commit(consumer, answered)  # a clean stop keeps what it answered
        with contextlib.suppress(Exception):
            await consumer.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        log.info("node %s stopped", hospital_id)


@dataclass(frozen=True, slots=True)
class _Fetched:
    msg: ConsumerRecord
    aggregate: bool  # an aggregate query: batched with the aggregate queries next to it


def _peek(msg: ConsumerRecord) -> tuple[str, bool]:
    """The request's priority, for the intake queue, and whether it is an aggregate query (an
    undecodable message counts as a normal, lone request; the handler dead-letters it)."""
    try:
        routed = codec.decode_as(RoutedRequest, msg.value, msg.headers)
    except Exception:
        return "normal", False
    return priority_of(routed), (routed.get("request") or {}).get("kind") == "aggregate"


async def _deliver_batch(
    msgs: list[ConsumerRecord],
    worker: NodeWorker,
    *,
    bus: Bus,
    policy: RetryPolicy,
    stop: asyncio.Event,
) -> None:
    """Handle ``msgs`` as one batch; if it keeps failing, one by one (a replay re-sends what a
    failed batch already released, so nothing is drawn twice), dead-lettering a poison one."""
    if len(msgs) > 1:
        outcome = await deliver(
            msgs[0],
            functools.partial(worker.handle_batch, msgs),
            bus=bus,
            service=SERVICE,
            policy=policy,
            stop=stop,
            batch=len(msgs),
        )
        if outcome == "handled":
            return
    for msg in msgs:
        await deliver(
            msg,
            functools.partial(worker.handle, msg),
            bus=bus,
            service=SERVICE,
            policy=policy,
            on_dead=functools.partial(worker.fail, msg),
            stop=stop,
        )


async def _commit(consumer: Any, offsets: dict[TopicPartition, int]) -> None:
    """Commit after the results are sent (one round trip for a drained queue, not one per
    request). A failed commit (the group rebalanced while the model worked) is not fatal: the
    request is re-delivered and answered from the replay cache."""
    if not offsets:
        return
    try:
        await consumer.commit(
            {TopicPartition(tp.topic, tp.partition): off for tp, off in offsets.items()}
        )
    except (CommitFailedError, KafkaError, IllegalStateError) as exc:
        log.warning("offset commit failed (the result was sent; a replay is idempotent): %r", exc)


async def wait_ready(settings: Settings, hospital_id: str, *, timeout_s: float = 60.0) -> None:
    """Poll for the readiness marker (for tests and the launcher)."""
    from fedllm.common.lifecycle import ready_path

    deadline = time.monotonic() + timeout_s
    path = ready_path(settings, f"node-{hospital_id}")
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {hospital_id} not ready after {timeout_s} s")
        await asyncio.sleep(0.1)

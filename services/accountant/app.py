"""The accountant as a faust-streaming app: three agents and a timer.

- `reserve_budget` over fedllm.requests (keyed by user) reserves (ε, δ) and emits the decision;
- `settle_budget` over fedllm.node-results commits what was spent and refunds the rest;
  both take events in batches (`stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S)`), one
  ledger transaction per batch;
- `apply_adjustment` over fedllm.admin applies an admin's budget reset;
- `relay_replies` over fedllm.results copies each terminal result to its owner's reply topic;
- `expire_reservations` times out requests whose deadline passed (on every instance; the
  ledger's row transition lets exactly one of them act).

Offsets are acked only after an event is fully handled (faust at-least-once); the ledger makes
every replay a no-op. Messages are raw bytes here and decoded with the shared Avro codec, so an
undecodable one is dead-lettered instead of crashing the agent.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from fedllm.common import codec, metrics, topics
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.faust_transport import broker_urls
from fedllm.common.kafka import Bus, make_producer, ssl_context
from fedllm.common.lifecycle import mark_ready
from fedllm.common.metrics import MESSAGES
from fedllm.privacy.accountant import RdpAccountant
from services.accountant.handlers import SERVICE, Accountant
from services.accountant.ledger import Ledger
from services.accountant.replies import ReplyRelay

log = logging.getLogger(__name__)

#: Events per ledger transaction, and how long a partial batch waits for more (also the
#: latency a lone request pays, on average half of it).
BATCH_MAX = 256
BATCH_WITHIN_S = 0.01


def create_app(settings: Settings) -> faust.App:
    """Build the faust app and its agents for `settings`."""
    tls = ssl_context(settings)
    app = faust.App(
        "fedllm-accountant",
        broker_credentials=faust.SSLCredentials(tls) if tls else None,
        broker=broker_urls(settings.kafka_bootstrap),
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=topics.PARTITIONS[topics.REQUESTS],
        topic_replication_factor=1,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.heartbeat_interval_ms / 1000,
        broker_commit_every=1,
        broker_commit_interval=0.5,
        producer_linger_ms=0,
    )
    requests_topic = app.topic(topics.REQUESTS, key_type=bytes, value_type=bytes,
                               partitions=topics.PARTITIONS[topics.REQUESTS])
    node_results_topic = app.topic(topics.NODE_RESULTS, key_type=bytes, value_type=bytes,
                                   partitions=topics.PARTITIONS[topics.NODE_RESULTS])
    results_topic = app.topic(topics.RESULTS, key_type=bytes, value_type=bytes,
                              partitions=topics.PARTITIONS[topics.RESULTS])
    admin_topic = app.topic(topics.ADMIN, key_type=bytes, value_type=bytes,
                            partitions=topics.PARTITIONS[topics.ADMIN])
    state: dict[str, Any] = {}

    async def accountant() -> Accountant:
        """The Accountant, built on first use inside the worker's event loop."""
        if "accountant" not in state:
            producer: AIOKafkaProducer = make_producer(settings)
            await producer.start()
            ledger = Ledger(make_engine(settings.resolved_database_url()), settings.budget,
                            RdpAccountant())
            state["producer"] = producer
            state["accountant"] = Accountant(settings, ledger, Bus(producer))
            state["replies"] = ReplyRelay(settings, Bus(producer))
        return state["accountant"]

    async def decode(events: list[faust.types.EventT], schema: str
                     ) -> list[tuple[dict[str, Any], list[tuple[str, bytes]]]]:
        """The batch's records with their headers; undecodable messages go to the DLQ."""
        acct = await accountant()
        decoded = []
        for event in events:
            msg = event.message
            try:
                record = codec.decode_expect(schema, msg.value, msg.headers)
            except codec.DecodeError as exc:
                await acct.bus.dead_letter(msg, str(exc), service=SERVICE)  # type: ignore[arg-type]
                MESSAGES.labels(SERVICE, msg.topic, "dead_lettered").inc()
                continue
            hdrs = msg.headers or ()
            decoded.append((record, list(hdrs.items() if isinstance(hdrs, dict) else hdrs)))
        return decoded

    async def handle(events: list[faust.types.EventT], schema: str) -> None:
        decoded = await decode(events, schema)
        if not decoded:
            return
        topic = events[0].message.topic
        # One span per batch, continuing its first event's trace (a batched hop links the
        # other requests' traces only through their audit records).
        with metrics.stage(SERVICE, schema, request_id=decoded[0][0].get("request_id", ""),
                           headers=events[0].message.headers):
            await dispatch(topic, schema, decoded)
        MESSAGES.labels(SERVICE, topic, "handled").inc(len(decoded))

    async def dispatch(topic: str, schema: str,
                       decoded: list[tuple[dict[str, Any], list[tuple[str, bytes]]]]) -> None:
        acct = await accountant()
        records = [record for record, _ in decoded]
        if topic == topics.RESULTS:
            for record in records:
                await state["replies"].relay(record)
        elif schema == "InferenceRequest":
            await acct.on_requests(decoded)
        elif schema == "BudgetAdjustment":
            for record in records:
                await acct.on_adjustment(record)
        else:
            await acct.on_node_results(records)

    @app.agent(requests_topic, name="reserve_budget")
    async def reserve_budget(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await handle(list(events), "InferenceRequest")

    @app.agent(node_results_topic, name="settle_budget")
    async def settle_budget(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            await handle(list(events), "InferenceResult")

    @app.agent(admin_topic, name="apply_adjustment")
    async def apply_adjustment(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await handle([event], "BudgetAdjustment")

    @app.agent(results_topic, name="relay_replies")
    async def relay_replies(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await handle([event], "InferenceResult")

    @app.timer(interval=1.0)  # every instance: settle() lets only one of them act
    async def expire_reservations() -> None:
        n = await (await accountant()).sweep_expired()
        if n:
            log.info("timed out %d reservation(s)", n)

    @app.timer(interval=0.5)
    async def report_ready() -> None:
        if not state.get("ready") and app.consumer.assignment():
            await accountant()
            mark_ready(settings, "accountant")
            state["ready"] = True

    @app.on_before_shutdown.connect
    async def close_producer(app: faust.App, **_: Any) -> None:
        if "replies" in state:
            await state["replies"].close()
        if "producer" in state:
            await state["producer"].stop()

    return app

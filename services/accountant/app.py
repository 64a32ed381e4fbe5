"""The accountant as a faust-streaming app: two agents and a timer.

- `reserve_budget` over fedllm.requests (keyed by user) reserves (ε, δ) and emits the decision;
- `settle_budget` over fedllm.node-results commits what was spent and refunds the rest;
- `apply_adjustment` over fedllm.admin applies an admin's budget reset;
- `expire_reservations` times out requests whose deadline passed (on every instance; the
  ledger's row transition lets exactly one of them act).

Every event goes through `fedllm.common.delivery.deliver` (retry with backoff, then a terminal
failed outcome and the DLQ) and is acked only after it returns; the ledger makes every replay a
no-op, and the messages a transition implies leave through the outbox relay. Messages are raw bytes here and decoded with the shared Avro codec, so an
undecodable one is dead-lettered instead of crashing the agent.
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.delivery import RetryPolicy, deliver
from fedllm.common.faust_transport import broker_urls
from fedllm.common.kafka import Bus, make_producer, ssl_context
from fedllm.common.lifecycle import mark_ready
from fedllm.common.metrics import MESSAGES
from fedllm.privacy.accountant import RdpAccountant
from services.accountant.handlers import SERVICE, Accountant
from services.accountant.ledger import Ledger

log = logging.getLogger(__name__)


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
        return state["accountant"]

    policy = RetryPolicy.from_settings(settings)

    async def handle(event: faust.types.EventT, schema: str) -> None:
        """Decode and deliver one event; it is acked only after `deliver` returns."""
        acct = await accountant()
        msg = event.message
        try:
            record = codec.decode_expect(schema, msg.value, msg.headers)
        except codec.DecodeError as exc:
            await acct.bus.dead_letter(msg, str(exc), service=SERVICE)  # type: ignore[arg-type]
            MESSAGES.labels(SERVICE, msg.topic, "dead_lettered").inc()
            return
        handler, on_dead = {
            "InferenceRequest": (acct.on_request, acct.fail_request),
            "BudgetAdjustment": (acct.on_adjustment, acct.fail_adjustment),
            "InferenceResult": (acct.on_node_result, acct.fail_node_result),
        }[schema]
        await deliver(msg, lambda: handler(record), bus=acct.bus, service=SERVICE,
                      policy=policy, on_dead=lambda reason: on_dead(record, reason))

    async def consume(stream: faust.StreamT, schema: str) -> None:
        # faust acks an event in a `finally` (even when the handler raised); a noack stream
        # and an explicit ack after delivery keep an unfinished event unacknowledged.
        async for event in stream.noack().events():
            await handle(event, schema)
            event.ack()

    @app.agent(requests_topic, name="reserve_budget")
    async def reserve_budget(stream: faust.StreamT) -> None:
        await consume(stream, "InferenceRequest")

    @app.agent(node_results_topic, name="settle_budget")
    async def settle_budget(stream: faust.StreamT) -> None:
        await consume(stream, "InferenceResult")

    @app.agent(admin_topic, name="apply_adjustment")
    async def apply_adjustment(stream: faust.StreamT) -> None:
        await consume(stream, "BudgetAdjustment")

    @app.timer(interval=1.0)  # every instance: settle() lets only one of them act
    async def expire_reservations() -> None:
        n = await (await accountant()).sweep_expired()  # logs and survives its own errors
        if n:
            log.info("timed out %d reservation(s)", n)

    @app.timer(interval=0.5)
    async def relay_outbox() -> None:
        await (await accountant()).relay_outbox()  # what a crash or a broker error left unsent

    @app.timer(interval=0.5)
    async def report_ready() -> None:
        if not state.get("ready") and app.consumer.assignment():
            await accountant()
            mark_ready(settings, "accountant")
            state["ready"] = True

    @app.on_before_shutdown.connect
    async def close_producer(app: faust.App, **_: Any) -> None:
        if "producer" in state:
            await state["producer"].stop()

    return app

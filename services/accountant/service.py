"""The accountant as a faust-streaming app: three agents and a timer.

- `reserve_budget` over fedllm.requests (keyed by user) reserves (ε, δ) and emits the decision;
- `settle_budget` over fedllm.node-results commits what was spent and refunds the rest;
  both take events in natural batches (`batches.natural_batches`: what arrived while the
  previous batch was handled, up to `accountant_batch_max`, with no timer), one ledger
  transaction per batch;
- `apply_adjustment` over fedllm.admin applies an admin's budget reset;
- `relay_replies` over fedllm.results copies each terminal result to its owner's reply topic
  (in natural batches: one reply-topic look-up per batch);
- `expire_reservations` times out requests whose deadline passed (on every instance; the
  ledger's row transition lets exactly one of them act).

Each batch goes through `fedllm.common.delivery.deliver` (retry with backoff); if it still
fails, its events are delivered one by one, each to its own terminal outcome (a failed result
and a refund) and the DLQ, so a poison event cannot hold up the others. Events are acked only
after that returns (the stream is read with `noack()`: faust's `take_events` would ack them
even when the handler was interrupted); the ledger makes every replay a no-op, and the
messages a ledger transition implies leave through the outbox relay (after each batch and
every 0.5 s). Messages are raw
bytes here and decoded with the shared Avro codec, so an undecodable one is dead-lettered
instead of crashing the agent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaProducer

from fedllm.common import codec, metrics, topics
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.delivery import RetryPolicy, deliver
from fedllm.common.faust_transport import broker_urls
from fedllm.common.kafka import Bus, make_producer, ssl_context
from fedllm.common.lifecycle import mark_ready
from fedllm.common.metrics import MESSAGES
from fedllm.privacy.accountant import RdpAccountant
from fedllm.services.accountant.batches import natural_batches
from fedllm.services.accountant.handlers import SERVICE, Accountant
from fedllm.services.accountant.ledger import Ledger
from fedllm.services.accountant.replies import ReplyRelay

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded event of a batch."""

    event: Any  # faust.types.EventT
    record: Any  # the batch schema's record (a TypedDict of fedllm.schemas.records)
    headers: list[tuple[str, bytes]]


def create_app(settings: Settings) -> faust.App:
    """Build the faust app and its agents for `settings`."""
    tls = ssl_context(settings)
    app = faust.App(
        topics.scoped(settings, "fedllm-accountant"),
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
        broker_commit_every=settings.accountant_commit_every,
        broker_commit_interval=settings.accountant_commit_interval_s,
        producer_linger_ms=0,
    )
    requests_topic = app.topic(
        topics.scoped(settings, topics.REQUESTS),
        key_type=bytes,
        value_type=bytes,
        partitions=topics.PARTITIONS[topics.REQUESTS],
    )
    node_results_topic = app.topic(
        topics.scoped(settings, topics.NODE_RESULTS),
        key_type=bytes,
        value_type=bytes,
        partitions=topics.PARTITIONS[topics.NODE_RESULTS],
    )
    results_topic = app.topic(
        topics.scoped(settings, topics.RESULTS),
        key_type=bytes,
        value_type=bytes,
        partitions=topics.PARTITIONS[topics.RESULTS],
    )
    admin_topic = app.topic(
        topics.scoped(settings, topics.ADMIN),
        key_type=bytes,
        value_type=bytes,
        partitions=topics.PARTITIONS[topics.ADMIN],
    )
    state: dict[str, Any] = {}
    building = asyncio.Lock()  # the timers and agents may all ask for it first at once
    batch_max = settings.accountant_batch_max

    async def accountant() -> Accountant:
        """The Accountant, built on first use inside the worker's event loop."""
        if "accountant" not in state:
            async with building:  # one producer, however many ask first at once
                if "accountant" not in state:
                    producer: AIOKafkaProducer = make_producer(settings)
                    await producer.start()
                    ledger = Ledger(
                        make_engine(settings.resolved_database_url()),
                        settings.budget,
                        RdpAccountant(),
                    )
                    state["producer"] = producer
                    bus = Bus(producer, settings.topic_namespace)
                    state["replies"] = ReplyRelay(settings, bus)
                    state["accountant"] = Accountant(settings, ledger, bus)
        return state["accountant"]

    policy = RetryPolicy.from_settings(settings)

    async def decode(events: list[faust.types.EventT], schema: str) -> list[Decoded]:
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
            decoded.append(
                Decoded(event, record, list(hdrs.items() if isinstance(hdrs, dict) else hdrs))  # type: ignore[arg-type]
            )
        return decoded

    async def handle(events: list[faust.types.EventT], schema: str) -> None:
        """Deliver a batch (see the module docstring), then ack its events."""
        decoded = await decode(events, schema)
        if decoded:
            acct = await accountant()
            topic = events[0].message.topic
            handler, on_dead = handlers(acct, topic, schema)
            first = decoded[0].event.message
            # One span per batch, continuing its first event's trace (a batched hop links the
            # other requests' traces only through their audit records).
            with metrics.stage(
                SERVICE,
                schema,
                request_id=decoded[0].record.get("request_id", ""),
                headers=first.headers,
            ):
                done = await deliver(
                    first,
                    lambda: handler(decoded),
                    bus=acct.bus,
                    service=SERVICE,
                    policy=policy,
                    batch=len(decoded),
                )
            if done == "failed":
                log.warning(
                    "a batch of %d %s event(s) failed; delivering them one by one",
                    len(decoded),
                    schema,
                )
                for one in decoded:
                    await deliver(
                        one.event.message,
                        functools.partial(handler, [one]),
                        bus=acct.bus,
                        service=SERVICE,
                        policy=policy,
                        on_dead=None if on_dead is None else functools.partial(on_dead, one.record),
                    )
        for event in events:
            event.ack()

    def handlers(
        acct: Accountant, topic: str, schema: str
    ) -> tuple[
        Callable[[list[Decoded]], Awaitable[None]],
        Callable[[Any, str], Awaitable[None]] | None,
    ]:
        """The batch handler for `topic`/`schema` and the terminal outcome of one event."""
        if topic == topics.scoped(settings, topics.RESULTS):

            async def relay(batch: list[Decoded]) -> None:
                await state["replies"].relay_many([one.record for one in batch])

            return relay, None
        if schema == "InferenceRequest":

            async def reserve(batch: list[Decoded]) -> None:
                await acct.on_requests([(one.record, one.headers) for one in batch])

            return reserve, acct.fail_request
        if schema == "BudgetAdjustment":

            async def adjust(batch: list[Decoded]) -> None:
                for one in batch:
                    await acct.on_adjustment(one.record)

            return adjust, acct.fail_adjustment

        async def settle(batch: list[Decoded]) -> None:
            await acct.on_node_results([one.record for one in batch])

        return settle, acct.fail_node_result

    @app.agent(requests_topic, name="reserve_budget")
    async def reserve_budget(stream: faust.StreamT) -> None:
        async for events in natural_batches(stream.noack().events(), batch_max):
            await handle(events, "InferenceRequest")

    @app.agent(node_results_topic, name="settle_budget")
    async def settle_budget(stream: faust.StreamT) -> None:
        async for events in natural_batches(stream.noack().events(), batch_max):
            await handle(events, "InferenceResult")

    @app.agent(admin_topic, name="apply_adjustment")
    async def apply_adjustment(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            await handle([event], "BudgetAdjustment")

    @app.agent(results_topic, name="relay_replies")
    async def relay_replies(stream: faust.StreamT) -> None:
        async for events in natural_batches(stream.noack().events(), batch_max):
            await handle(events, "InferenceResult")

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
        if "replies" in state:
            await state["replies"].close()
        if "producer" in state:
            await state["producer"].stop()

    return app

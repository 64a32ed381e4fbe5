"""The auditor: consume fedllm.audit, store each event once in the chained log, then commit.

Order per batch: decode (undecodable → fedllm.audit.dlq) → one DB transaction → Kafka offsets.
A DB outage blocks the loop with backoff; nothing is skipped and offsets stay behind, so a crash
re-delivers and the event_id uniqueness drops the repeats (at-least-once in, exactly-once stored).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.errors import CommitFailedError, KafkaError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from fedllm.common import metrics, topics, tracing
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.kafka import Bus, make_consumer, make_producer
from fedllm.common.lifecycle import clear_ready, mark_ready
from fedllm.schemas.records import AuditEvent
from fedllm.services.auditor import migrate, store
from fedllm.services.auditor.rows import InvalidEvent, Protection, event_to_row
from fedllm.services.auditor.settings import AuditorSettings

log = logging.getLogger(__name__)
SERVICE = "auditor"


class Stopped(Exception):
    """Asked to stop while waiting for the database; the batch stays uncommitted."""


async def with_db_retry(
    fn: Any, *args: Any, cfg: AuditorSettings, stop: asyncio.Event, what: str
) -> Any:
    """Run blocking `fn(*args)` in a thread until it succeeds, backing off on DB errors."""
    delay = cfg.retry_initial_s
    attempt = 0
    while True:
        try:
            return await asyncio.to_thread(fn, *args)
        except (OperationalError, DBAPIError) as exc:
            attempt += 1
            log.warning(
                "%s failed (attempt %d), retrying in %.1fs: %s",
                what,
                attempt,
                delay,
                str(exc).splitlines()[0],
            )
        if stop.is_set():
            raise Stopped(what)
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
        delay = min(delay * 2, cfg.retry_max_s)


def _engine(url: str) -> Engine:
    """The store's engine; Postgres connects time out (10 s) instead of hanging in an outage."""
    if url.startswith("postgres") and "connect_timeout" not in url:
        url += ("&" if "?" in url else "?") + "connect_timeout=10"
    return make_engine(url)


async def decode_batch(
    bus: Bus, messages: list[ConsumerRecord], protection: Protection
) -> list[dict[str, Any]]:
    """Rows for the decodable, storable messages; the others go to the DLQ."""
    rows: list[dict[str, Any]] = []
    for msg in messages:
        with tracing.span("auditor AuditEvent", msg.headers):  # joins the request's trace
            event = await bus.decode_or_dead_letter(msg, AuditEvent, service=SERVICE)
        if event is None:
            continue
        try:
            row = event_to_row(event, protection)
        except InvalidEvent as exc:
            await bus.dead_letter(msg, f"invalid AuditEvent: {exc}", service=SERVICE)
            continue
        row["source_partition"], row["source_offset"] = msg.partition, msg.offset
        rows.append(row)
    return rows


class _ReadyOnAssignment(ConsumerRebalanceListener):
    """Marks the service ready once the group has given it its partitions."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        mark_ready(self.settings, SERVICE)
        log.info("auditor assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


async def consume(
    consumer: AIOKafkaConsumer,
    bus: Bus,
    engine: Engine,
    *,
    cfg: AuditorSettings,
    protection: Protection,
    stop: asyncio.Event,
) -> int:
    """The loop: batch, store, commit. Returns the number of rows stored."""
    total = 0
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=cfg.batch_wait_ms, max_records=cfg.batch_max)
        if not batches:
            continue
        metrics.record_lag(SERVICE, consumer, batches)
        messages = [m for tp in sorted(batches, key=lambda t: t.partition) for m in batches[tp]]
        rows = await decode_batch(bus, messages, protection)
        if rows:
            try:
                with metrics.stage(SERVICE, "AuditEvent batch"):
                    result = await with_db_retry(
                        store.append, engine, rows, cfg=cfg, stop=stop, what="storing audit batch"
                    )
            except Stopped:
                log.warning(
                    "stopped with %d audit events unstored; they will be re-read", len(rows)
                )
                return total
            total += result.stored
            log.debug("stored %d, duplicates %d", result.stored, result.duplicates)
        offsets = {tp: msgs[-1].offset + 1 for tp, msgs in batches.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Rebalanced: the stored rows will be re-delivered and dropped as duplicates.
            log.warning("offset commit failed (events stored; repeats are idempotent): %s", exc)
    return total


async def run(
    settings: Settings, *, stop: asyncio.Event, cfg: AuditorSettings | None = None
) -> None:
    """Migrate, then consume the audit topic until `stop` is set."""
    cfg = cfg or AuditorSettings()
    protection = Protection.from_settings(cfg)
    if protection.sealer is None:
        log.warning(
            "FEDLLM_AUDIT_ENCRYPTION_KEY not set: clear text met in events is dropped, not sealed"
        )
    engine = _engine(settings.resolved_database_url())
    try:
        await with_db_retry(migrate.upgrade, engine, cfg=cfg, stop=stop, what="migrating")
    except Stopped:
        engine.dispose()
        return
    consumer = make_consumer(
        settings, group_id=cfg.group_id, fetch_max_wait_ms=settings.background_fetch_max_wait_ms
    )
    consumer.subscribe(
        [topics.scoped(settings, topics.AUDIT)], listener=_ReadyOnAssignment(settings)
    )
    producer = make_producer(settings)
    await producer.start()
    await consumer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        await consume(consumer, bus, engine, cfg=cfg, protection=protection, stop=stop)
    finally:
        clear_ready(settings, SERVICE)
        await consumer.stop()
        await producer.stop()
        engine.dispose()

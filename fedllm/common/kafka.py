"""Kafka client factory, topic creation, typed send and dead-lettering (aiokafka).

Clients are configured for at-least-once delivery without idempotence or transactions
(the local Tansu broker supports neither); every consumer must be idempotent by id.

`Bus.send`, `make_consumer` and `ensure_topics` take logical topic names (fedllm.common.topics)
and put them in the topic namespace; code that names a partition or asks the client about a
topic itself uses `topics.scoped`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, overload

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest

from fedllm.common import codec, fetch_wait, metrics, topics, tracing
from fedllm.common.clock import now_ms as now_ms  # re-exported: services import it from here
from fedllm.common.config import Settings

R = TypeVar("R")

log = logging.getLogger(__name__)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS context for Kafka (server verified against kafka_ssl_cafile; client certificate for
    mTLS when kafka_ssl_certfile is set), or None for PLAINTEXT."""
    if settings.kafka_security_protocol == "PLAINTEXT":
        return None
    ctx = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.kafka_ssl_certfile:
        ctx.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
    return ctx


def _security(settings: Settings) -> dict[str, Any]:
    ctx = ssl_context(settings)
    if ctx is None:
        return {}
    return {"security_protocol": settings.kafka_security_protocol, "ssl_context": ctx}


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer for request/reply traffic: no linger, acks from all replicas."""
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "linger_ms": 0,
        "acks": "all",
        "enable_idempotence": False,
        **_security(settings),
    }
    kw.update(overrides)
    return AIOKafkaProducer(**kw)


class Consumer(AIOKafkaConsumer):  # type: ignore[misc]  # aiokafka is untyped
    """An aiokafka consumer whose fetch wait lengthens while it is idle
    (`fedllm.common.fetch_wait`)."""

    def __init__(self, *topics: str, settings: Settings, **kw: Any) -> None:
        super().__init__(*topics, **kw)
        self._settings = settings

    async def start(self) -> None:
        await super().start()
        fetch_wait.adapt_to(self, self._settings)


def make_consumer(
    settings: Settings, *topic_names: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer with manual commits and a short fetch wait (see BROKER notes), longer while
    idle (`idle_fetch_max_wait_ms`). `topic_names` and `group_id` are logical: both are put in
    the settings' topic namespace."""
    ns = settings.topic_namespace  # topics.scoped, for many names
    kw: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "group_id": None if group_id is None else ns + group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        **_security(settings),
    }
    kw.update(overrides)
    return Consumer(*(ns + t for t in topic_names), settings=settings, **kw)


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    """An admin client with the deployment's TLS settings (not started)."""
    return AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **_security(settings))


async def ensure_topics(settings: Settings, wanted: dict[str, int]) -> None:
    """Create every topic explicitly with its partition count (never rely on auto-create);
    `wanted` has logical names, created in the settings' topic namespace."""
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        scoped = {topics.scoped(settings, t): n for t, n in wanted.items()}
        new = [
            NewTopic(name=t, num_partitions=n, replication_factor=1)
            for t, n in scoped.items()
            if t not in existing
        ]
        if new:
            try:
                await admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()


async def existing_topics(admin: AIOKafkaAdminClient, names: Sequence[str]) -> set[str]:
    """Those of `names` (broker names) that exist, asked about by name: one metadata request
    whose cost does not grow with the cluster's topic count (as `list_topics` does), and
    which never creates a topic (aiokafka's `describe_topics` would let a broker with
    `auto.create.topics.enable` create every name it is asked about)."""
    if not names:
        return set()
    request = MetadataRequest(list(names), allow_auto_topic_creation=False)
    response = (await admin._send_request(request)).to_object()  # no public call takes the flag
    return {t["topic"] for t in response["topics"] if t["error_code"] == 0}


async def wait_for_broker(settings: Settings, timeout_s: float = 30.0) -> None:
    """Block until the broker answers metadata requests."""
    deadline = time.monotonic() + timeout_s
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap, **_security(settings)
        )
        try:
            await admin.start()
            await admin.list_topics()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        finally:
            await admin.close()


class MissingTopicError(RuntimeError):
    """A topic a consumer needs has no partitions in the cluster's metadata."""


async def partitions_of(
    consumer: AIOKafkaConsumer,
    topic_names: str | Sequence[str],
    *,
    wait_s: float = 0.0,
    missing_ok: bool = False,
) -> list[TopicPartition]:
    """Every partition of the topics, in topic then partition order. The metadata is refreshed,
    and again every 0.1 s for up to ``wait_s`` while a topic is missing; then a missing topic
    raises :class:`MissingTopicError`, or with ``missing_ok`` contributes no partitions."""
    names = [topic_names] if isinstance(topic_names, str) else list(topic_names)
    deadline = time.monotonic() + wait_s
    while True:
        # `consumer.topics()` fetches into a throwaway copy; this refreshes the metadata that
        # `partitions_for_topic` reads (aiokafka has no public call for it)
        await consumer._client.force_metadata_update()  # noqa: SLF001
        found = {t: sorted(consumer.partitions_for_topic(t) or ()) for t in names}
        missing = [t for t in names if not found[t]]
        if not missing or missing_ok:
            return [TopicPartition(t, p) for t in names for p in found[t]]
        if time.monotonic() >= deadline:
            raise MissingTopicError(f"topic {missing[0]} does not exist; run `fedllm topics` first")
        await asyncio.sleep(0.1)


async def assign_all(
    consumer: AIOKafkaConsumer,
    topic_names: str | Sequence[str],
    *,
    wait_s: float = 0.0,
    missing_ok: bool = False,
) -> list[TopicPartition]:
    """Assign every partition of the topics to a group-less consumer (:func:`partitions_of`)."""
    tps = await partitions_of(consumer, topic_names, wait_s=wait_s, missing_ok=missing_ok)
    consumer.assign(tps)
    return tps


async def seek_all(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], *, to_end: bool
) -> None:
    """Position the partitions at their ends (``to_end``) or beginnings, and resolve that lazy
    reset now, so nothing published after this returns is skipped."""
    if to_end:
        await consumer.seek_to_end(*tps)
    else:
        await consumer.seek_to_beginning(*tps)
    for tp in tps:
        await consumer.position(tp)


async def seek_to_time(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], ts_ms: int
) -> dict[TopicPartition, tuple[int, int]]:
    """Position each partition at its first record at or after `ts_ms` (the end if none);
    returns each partition's (start, end) offsets, the end as of now."""
    found = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
    ends = await consumer.end_offsets(list(tps))
    out = {}
    for tp in tps:
        hit = found.get(tp)
        out[tp] = (hit.offset if hit is not None else ends[tp], ends[tp])
        consumer.seek(tp, out[tp][0])
    return out


class Bus:
    """Typed producer: Avro-encodes records and sends them with schema headers."""

    def __init__(self, producer: AIOKafkaProducer, namespace: str = "") -> None:
        self.producer = producer
        self.namespace = namespace  # Settings.topic_namespace: `send` takes logical names

    async def send(
        self,
        topic: str,
        schema: str,
        record: Mapping[str, Any],
        *,
        key: str | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Send one record; `headers` are added to the schema headers (e.g. a credential)."""
        value, schema_headers = codec.encode(schema, record)
        await self.producer.send_and_wait(
            self.namespace + topic,
            value=value,
            key=key.encode() if key else None,
            headers=schema_headers + list(headers or ()) + tracing.inject_headers(),
        )

    async def dead_letter(
        self, msg: ConsumerRecord, error: str, *, service: str, attempts: int = 0
    ) -> None:
        """Send the raw message to `<topic>.dlq` with its error and origin in headers
        (`dlq-attempts`: how often a handler failed on it; 0 for an undecodable message)."""
        headers = list(msg.headers or []) + [
            ("dlq-attempts", str(attempts).encode()),
            ("dlq-error", error[:1000].encode()),
            ("dlq-origin-topic", msg.topic.encode()),
            ("dlq-origin-partition", str(msg.partition).encode()),
            ("dlq-origin-offset", str(msg.offset).encode()),
            ("dlq-service", service.encode()),
        ]
        await self.producer.send_and_wait(
            topics.dlq(msg.topic), value=msg.value, key=msg.key, headers=headers
        )
        metrics.DLQ.labels(service, msg.topic).inc()
        log.warning(
            "dead-lettered %s[%d]@%d from %s: %s",
            msg.topic,
            msg.partition,
            msg.offset,
            service,
            error,
        )

    @overload
    async def decode_or_dead_letter(
        self, msg: ConsumerRecord, expect: type[R], *, service: str
    ) -> R | None: ...

    @overload
    async def decode_or_dead_letter(
        self, msg: ConsumerRecord, expect: str, *, service: str
    ) -> dict[str, Any] | None: ...

    async def decode_or_dead_letter(
        self, msg: ConsumerRecord, expect: str | type[Any], *, service: str
    ) -> Any:
        """Decode `msg` as `expect` (a schema's short name, or its record type in
        `fedllm.schemas.records`); on failure dead-letter it and return None."""
        try:
            name = expect if isinstance(expect, str) else expect.__name__
            return codec.decode_expect(name, msg.value, msg.headers)
        except codec.DecodeError as exc:
            await self.dead_letter(msg, str(exc), service=service)
            return None

"""Small real-broker helpers for tests: produce typed records, collect decoded records.

Topics are logical names (fedllm.common.topics), put in the settings' topic namespace."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.grants import new_keypair, sign_grants
from fedllm.common.identity import CREDENTIAL_HEADER, mint_token
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms

_MINT = object()


def unique_namespace() -> str:
    """A fresh topic namespace (Settings.topic_namespace): a test's or a fixture's own topics."""
    return f"t{uuid.uuid4().hex[:10]}."


def credential_headers(token: str | None) -> list[tuple[str, bytes]]:
    """The Kafka header carrying `token` as a bearer credential (none for None)."""
    return [] if token is None else [(CREDENTIAL_HEADER, f"Bearer {token}".encode())]


async def produce(
    settings: Settings,
    topic: str,
    schema: str,
    record: dict[str, Any],
    *,
    key: str | None = None,
    times: int = 1,
    token: Any = _MINT,
) -> None:
    """Send `record` `times` times. An InferenceRequest to the request topic carries a bearer
    token minted for its user, role and department unless `token` is given (None: no
    credential at all)."""
    if token is _MINT:
        token = (
            mint_token(
                settings,
                user_id=record["user_id"],
                role=record["role"],
                department=record["department"],
            )
            if topic == topics.REQUESTS and schema == "InferenceRequest"
            else None
        )
    producer = make_producer(settings)
    await producer.start()
    try:
        for _ in range(times):
            await Bus(producer, settings.topic_namespace).send(
                topic, schema, record, key=key, headers=credential_headers(token)
            )
    finally:
        await producer.stop()


async def produce_raw(
    settings: Settings, topic: str, value: bytes, headers: list[tuple[str, bytes]] | None = None
) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.scoped(settings, topic), value=value, headers=headers or []
        )
    finally:
        await producer.stop()


async def collect(
    settings: Settings,
    topic: str,
    *,
    until: Callable[[list[Any]], bool],
    timeout_s: float = 60.0,
    raw: bool = False,
) -> list[Any]:
    """Read `topic` from the beginning (all partitions) until `until(records)` or timeout.

    Decoded records, skipping undecodable ones; `raw=True` gives the ConsumerRecords."""
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        parts = await _partitions(consumer, topics.scoped(settings, topic))
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while not until(out) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for msgs in batch.values():
                for m in msgs:
                    if raw:
                        out.append(m)
                        continue
                    try:  # other tests share the broker and poison topics on purpose
                        out.append(codec.decode(m.value, m.headers)[1])
                    except codec.DecodeError:
                        continue
        return out
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> list[TopicPartition]:
    for _ in range(50):
        ps = consumer.partitions_for_topic(topic)
        if ps:
            return [TopicPartition(topic, p) for p in sorted(ps)]
        await consumer._client.force_metadata_update()  # noqa: SLF001
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no partitions for {topic}")


def inference_request(
    *,
    user_id: str = "u1",
    department: str = "cardiology",
    epsilon: float = 1.0,
    deadline_s: float = 60.0,
    **kw: Any,
) -> dict[str, Any]:
    """A valid InferenceRequest record."""
    rec = {
        "request_id": str(uuid.uuid4()),
        "user_id": user_id,
        "role": "doctor",
        "department": department,
        "kind": "generate",
        "prompt": "What is the usual treatment?",
        "max_tokens": 8,
        "temperature": 1.0,
        "epsilon": epsilon,
        "delta": 1e-5,
        "require_consensus": False,
        "priority": "normal",
        "hospitals": [],
        "source_address": "127.0.0.1",
        "created_at_ms": now_ms(),
        "deadline_ms": now_ms() + int(deadline_s * 1000),
    }
    rec.update(kw)
    return rec


# A reservation-grant key pair for tests that play the accountant towards a node.
GRANT_SEED, GRANT_PUBLIC = new_keypair()


def with_grant(routed: dict[str, Any], *, hospital_id: str | None = None) -> dict[str, Any]:
    """`routed` with the grant the accountant would have signed for `hospital_id` (default:
    the hospital it is routed to)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(GRANT_SEED))
    hid = hospital_id or routed["hospital_id"]
    routed["request"]["grants"] = sign_grants(key, routed["request"], [hid])
    return routed

"""`ask` over Kafka: produce an InferenceRequest carrying the caller's bearer token, read the
terminal answer from the caller's own reply topic.

The reply topic is `fedllm.replies.<user id>` (`fedllm.common.topics.reply_topic`); the
accountant copies each of the user's terminal results there, keyed by request id, once it has
verified the token. On Apache Kafka an ACL lets only that user read it (docs/security.md).
A request id doubles as the idempotency key: asking again under the same key never spends
twice, and the answer already on the reply topic is returned.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt

from fedllm.client.models import Answer, AskError, AskTimeout, Kind
from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.identity import CREDENTIAL_HEADER
from fedllm.common.kafka import (
    Bus,
    MissingTopicError,
    assign_all,
    ensure_topics,
    make_consumer,
    make_producer,
    now_ms,
    seek_all,
)
from fedllm.schemas.records import InferenceRequest, InferenceResult

MAX_KEY = 64


def token_claims(token: str) -> dict[str, Any]:
    """The token's claims, NOT verified (the accountant verifies): to address the request."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AskError(0, "the token is not a JWT") from None
    if not all(isinstance(claims.get(k), str) and claims[k] for k in ("sub", "role", "department")):
        raise AskError(0, "the token lacks sub, role or department")
    if isinstance(claims.get("exp"), int | float) and claims["exp"] <= time.time():
        raise AskError(401, "token expired")
    return claims


class KafkaClient:
    """A producing client: `settings` give the bootstrap servers and TLS (mTLS) options."""

    def __init__(
        self, *, token: str, bootstrap: str | None = None, settings: Settings | None = None
    ) -> None:
        settings = settings if settings is not None else Settings()
        if bootstrap:
            settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        if not settings.kafka_bootstrap:
            raise AskError(0, "no Kafka bootstrap servers (set KAFKA_BOOTSTRAP)")
        self.settings = settings
        self.token = token

    def ask(
        self,
        prompt: str,
        *,
        epsilon: float,
        max_tokens: int = 32,
        kind: Kind = "generate",
        department: str | None = None,
        hospitals: tuple[str, ...] = (),
        temperature: float = 1.0,
        timeout_s: float = 180.0,
        idempotency_key: str | None = None,
    ) -> Answer:
        """Ask one question; blocks until its terminal answer or `timeout_s`."""
        return asyncio.run(
            self.ask_async(
                prompt,
                epsilon=epsilon,
                max_tokens=max_tokens,
                kind=kind,
                department=department,
                hospitals=hospitals,
                temperature=temperature,
                timeout_s=timeout_s,
                idempotency_key=idempotency_key,
            )
        )

    async def ask_async(
        self,
        prompt: str,
        *,
        epsilon: float,
        max_tokens: int = 32,
        kind: Kind = "generate",
        department: str | None = None,
        hospitals: tuple[str, ...] = (),
        temperature: float = 1.0,
        timeout_s: float = 180.0,
        idempotency_key: str | None = None,
    ) -> Answer:
        claims = token_claims(self.token)
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_KEY:
            raise AskError(0, f"an idempotency key has 1..{MAX_KEY} characters")
        request_id = idempotency_key or str(uuid.uuid4())
        reply = topics.reply_topic(claims["sub"])
        await ensure_topics(self.settings, {reply: 1})
        started = now_ms()
        record: InferenceRequest = {
            "request_id": request_id,
            "user_id": claims["sub"],
            "role": claims["role"],
            "department": department or claims["department"],
            "kind": kind,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "epsilon": epsilon,
            "delta": 0.0,  # the accountant sets the deployment's delta
            "require_consensus": False,
            "priority": "normal",
            "hospitals": list(hospitals),
            "source_address": "",
            "created_at_ms": started,
            "deadline_ms": started + int(timeout_s * 1000),
        }
        consumer = make_consumer(self.settings, group_id=None)
        producer = make_producer(self.settings)
        await consumer.start()
        await producer.start()
        try:
            await self._listen(
                consumer,
                topics.scoped(self.settings, reply),
                from_start=idempotency_key is not None,
            )
            await Bus(producer, self.settings.topic_namespace).send(
                topics.REQUESTS,
                "InferenceRequest",
                record,
                key=claims["sub"],
                headers=[(CREDENTIAL_HEADER, f"Bearer {self.token}".encode())],
            )
            result = await self._await_result(consumer, request_id, timeout_s)
        finally:
            await producer.stop()
            await consumer.stop()
        return Answer.from_result(result)

    @staticmethod
    async def _listen(consumer: Any, reply: str, *, from_start: bool) -> None:
        """Assign every partition of the reply topic, positioned before producing."""
        try:
            tps = await assign_all(consumer, reply, wait_s=10.0)
        except MissingTopicError:
            raise AskError(0, f"reply topic {reply} not found") from None
        await seek_all(consumer, tps, to_end=not from_start)

    @staticmethod
    async def _await_result(consumer: Any, request_id: str, timeout_s: float) -> InferenceResult:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for msgs in batches.values():
                for msg in msgs:
                    if msg.key != request_id.encode():
                        continue
                    try:
                        result = codec.decode_as(InferenceResult, msg.value, msg.headers)
                    except codec.DecodeError:
                        continue
                    if result["request_id"] == request_id:
                        return result
        raise AskTimeout(request_id, timeout_s)

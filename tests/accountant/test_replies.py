"""The reply relay on the real broker: a result is copied to its owner's reply topic when that
topic exists, a topic created after a miss is found by the next batch, and asking never creates
a topic (every HTTP-only user would otherwise get one)."""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, admin_client, ensure_topics, existing_topics, make_producer
from fedllm.schemas.records import InferenceResult
from fedllm.services.accountant.replies import ReplyRelay
from tests.kafka_helpers import collect, unique_namespace


def _result(user: str, request_id: str) -> InferenceResult:
    return {
        "request_id": request_id,
        "user_id": user,
        "department": "emergency",
        "status": "ok",
        "finished_at_ms": 1,
    }


async def _names(admin: AIOKafkaAdminClient, settings: Settings) -> set[str]:
    return {t for t in await admin.list_topics() if t.startswith(settings.topic_namespace)}


async def test_results_reach_existing_reply_topics_and_no_topic_is_created(
    kafka_bootstrap: str,
) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace())
    await ensure_topics(settings, {topics.reply_topic("kafka-user"): 1})
    producer = make_producer(settings)
    await producer.start()
    admin = admin_client(settings)
    await admin.start()
    relay = ReplyRelay(settings, Bus(producer, settings.topic_namespace))
    try:
        before = await _names(admin, settings)
        copied = await relay.relay_many(
            [_result("kafka-user", "r1"), _result("http-user", "r2"), _result("", "r3")]
        )
        assert copied == 1
        assert await _names(admin, settings) == before  # asking created nothing

        # The HTTP user starts using Kafka: the next batch finds the new topic.
        await ensure_topics(settings, {topics.reply_topic("http-user"): 1})
        assert await relay.relay_many([_result("http-user", "r4")]) == 1

        got: dict[str, list[Any]] = {}
        for user in ("kafka-user", "http-user"):
            got[user] = await collect(
                settings, topics.reply_topic(user), until=lambda rs: len(rs) >= 1, timeout_s=20
            )
        assert [r["request_id"] for r in got["kafka-user"]] == ["r1"]
        assert [r["request_id"] for r in got["http-user"]] == ["r4"]  # r2 was never copied
    finally:
        await relay.close()
        await admin.close()
        await producer.stop()


async def test_existing_topics_answers_by_name_without_creating(kafka_bootstrap: str) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace())
    await ensure_topics(settings, {"present": 1})
    admin = admin_client(settings)
    await admin.start()
    try:
        ns = settings.topic_namespace
        found = await existing_topics(admin, [ns + "present", ns + "absent"])
        assert found == {ns + "present"}
        assert await _names(admin, settings) == {ns + "present"}
        assert await existing_topics(admin, []) == set()
    finally:
        await admin.close()

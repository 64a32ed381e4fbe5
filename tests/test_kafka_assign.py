"""The one assign/seek helper set of fedllm.common.kafka, against the embedded broker."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import TopicPartition

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import (
    MissingTopicError,
    assign_all,
    ensure_topics,
    make_consumer,
    make_producer,
    now_ms,
    partitions_of,
    seek_all,
    seek_to_time,
)
from tests.kafka_helpers import unique_namespace


async def test_assign_all_and_seeks(kafka_bootstrap: str) -> None:
    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace())
    a, b = (f"t.assign.{uuid.uuid4().hex[:8]}" for _ in range(2))
    await ensure_topics(settings, {a: 3, b: 1})
    a, b = (topics.scoped(settings, t) for t in (a, b))  # on the wire: what the helpers take
    producer = make_producer(settings)
    await producer.start()
    try:
        for p in range(3):
            for _ in range(2):
                await producer.send_and_wait(a, b"x", partition=p)
    finally:
        await producer.stop()
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        missing = f"t.assign.missing.{uuid.uuid4().hex[:8]}"
        with pytest.raises(MissingTopicError, match=missing):
            await partitions_of(consumer, [a, missing], wait_s=0.3)
        assert await partitions_of(consumer, missing, missing_ok=True) == []
        tps = await assign_all(consumer, [a, b], wait_s=5.0)
        assert tps == [TopicPartition(a, 0), TopicPartition(a, 1), TopicPartition(a, 2)] + [
            TopicPartition(b, 0)
        ]
        assert consumer.assignment() == set(tps)
        await seek_all(consumer, tps, to_end=True)
        assert [await consumer.position(tp) for tp in tps] == [2, 2, 2, 0]
        await seek_all(consumer, tps, to_end=False)
        assert [await consumer.position(tp) for tp in tps] == [0, 0, 0, 0]
        await seek_all(consumer, tps, to_end=True)
        span = await seek_to_time(consumer, tps[:3], 0)  # before every record: the starts
        assert span == {tp: (0, 2) for tp in tps[:3]}
        assert [await consumer.position(tp) for tp in tps[:3]] == [0, 0, 0]
        # (the embedded broker answers a lookup by time coarsely: check only that each partition
        # sits where the returned span starts, at or before its end)
        span = await seek_to_time(consumer, tps[:1], now_ms() + 3_600_000)
        (start, end), *_ = span.values()
        assert start <= end == 2 and await consumer.position(tps[0]) == start
    finally:
        await consumer.stop()

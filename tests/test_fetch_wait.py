"""An idle consumer's fetch wait lengthens, and snaps back on the first fetch with records."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import TopicPartition

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.fetch_wait import IdleFetchWait
from fedllm.common.kafka import ensure_topics, make_consumer, make_producer
from tests.kafka_helpers import unique_namespace


async def _fetches_in(consumer: object, seconds: float) -> int:
    """Fetch requests the consumer's fetcher makes in `seconds` of polling."""
    fetcher = consumer._fetcher  # type: ignore[attr-defined]
    count = 0
    inner = fetcher._proc_fetch_request

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal count
        count += 1
        return await inner(*args, **kwargs)

    fetcher._proc_fetch_request = counting
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await consumer.getmany(timeout_ms=50)  # type: ignore[attr-defined]
    finally:
        fetcher._proc_fetch_request = inner
    return count


async def test_idle_consumer_fetches_less_and_a_record_restores_the_short_wait(
    kafka_bootstrap: str,
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        fetch_max_wait_ms=10,
        idle_fetch_max_wait_ms=200,
        idle_after_ms=300,
    )
    topic = f"t.fetchwait.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, {topic: 1})
    topic = topics.scoped(settings, topic)  # on the wire: what aiokafka takes
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    producer = make_producer(settings)
    await producer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        switch = consumer._fetcher._idle_fetch_wait
        assert isinstance(switch, IdleFetchWait)
        await _fetches_in(consumer, 0.6)  # idle for longer than idle_after_ms
        assert switch.idle
        idle_fetches = await _fetches_in(consumer, 1.0)
        assert idle_fetches <= 8, idle_fetches  # ~5 at 200 ms (it was ~100 at 10 ms)

        await producer.send_and_wait(topic, b"wake")
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                got.extend(records)
        assert [m.value for m in got] == [b"wake"]
        assert not switch.idle
        assert consumer._fetcher._fetch_max_wait_ms == 10
        await asyncio.sleep(0)
        hot_fetches = await _fetches_in(consumer, 0.25)  # per second: > 2x the idle rate
        assert hot_fetches >= 2 * idle_fetches / 4, (hot_fetches, idle_fetches)
    finally:
        await producer.stop()
        await consumer.stop()


def test_no_switch_when_the_idle_wait_is_not_longer() -> None:
    from fedllm.common.fetch_wait import adapt

    class Fetcher:
        _fetch_max_wait_ms = 10

        async def _proc_fetch_request(self) -> bool:
            return False

    class Consumer:
        _fetcher = Fetcher()

    assert adapt(Consumer(), idle_ms=10, idle_after_ms=1) is None
    assert adapt(Consumer(), idle_ms=50, idle_after_ms=1) is not None


async def test_a_long_silence_moves_to_the_deep_idle_wait_and_data_restores_the_short_one() -> None:
    from fedllm.common.fetch_wait import adapt

    class Fetcher:
        _fetch_max_wait_ms = 10
        records = False

        async def _proc_fetch_request(self) -> bool:
            return self.records

    class Consumer:
        _fetcher = Fetcher()

    consumer = Consumer()
    switch = adapt(consumer, idle_ms=100, idle_after_ms=1_000, deep_ms=500, deep_after_ms=30_000)
    assert switch is not None
    fetcher = consumer._fetcher
    waits = []
    for silent_s in (0.5, 2.0, 31.0):  # how long no fetch has brought records
        switch.last_data = time.monotonic() - silent_s
        await fetcher._proc_fetch_request()
        waits.append(fetcher._fetch_max_wait_ms)
    assert waits == [10, 100, 500]
    fetcher.records = True
    await fetcher._proc_fetch_request()
    assert fetcher._fetch_max_wait_ms == 10 and not switch.idle
    # A deep tier no longer than the consumer's own wait is left out.
    assert adapt(Consumer(), idle_ms=5, idle_after_ms=1, deep_ms=10, deep_after_ms=2) is None

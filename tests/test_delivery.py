"""fedllm.common.delivery and fedllm.common.outbox against the real broker (and Postgres)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import update

from fedllm.common import outbox, topics
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.delivery import RetryPolicy, Stopped, deliver
from fedllm.common.kafka import Bus, ensure_topics, make_producer
from fedllm.common.outbox import Message, OutboxRow
from tests.kafka_helpers import collect, produce_raw, unique_namespace

FAST = RetryPolicy(attempts=3, initial_s=0.01, max_s=0.05)


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    return Settings(kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace())


async def _one_message(settings: Settings, topic: str) -> object:
    """Produce one raw message to a fresh topic and return it as consumed."""
    await ensure_topics(settings, {topic: 1, topics.dlq(topic): 1})
    await produce_raw(settings, topic, b"payload-" + topic.encode(), [("h", b"1")])
    (msg,) = await collect(settings, topic, until=lambda r: len(r) >= 1, raw=True, timeout_s=20)
    return msg


@contextlib.asynccontextmanager
async def bus_for(settings: Settings) -> AsyncIterator[Bus]:
    producer = make_producer(settings)
    await producer.start()
    try:
        yield Bus(producer, settings.topic_namespace)
    finally:
        await producer.stop()


async def test_failing_handler_is_retried_then_dead_lettered_with_its_terminal_outcome(
    settings: Settings,
) -> None:
    topic = f"t.delivery.{uuid.uuid4().hex[:8]}"
    msg = await _one_message(settings, topic)
    calls: list[str] = []
    dead: list[str] = []

    async def handler() -> None:
        calls.append("h")
        raise RuntimeError("database unavailable")

    async def on_dead(reason: str) -> None:
        dead.append(reason)

    async with bus_for(settings) as bus:
        got = await deliver(msg, handler, bus=bus, service="test", policy=FAST, on_dead=on_dead)
    assert got == "dead_lettered"
    assert len(calls) == 3
    assert len(dead) == 1 and "not processed after 3 attempts" in dead[0]
    assert "RuntimeError: database unavailable" in dead[0]
    (dlq,) = await collect(
        settings, topics.dlq(topic), until=lambda r: len(r) >= 1, raw=True, timeout_s=20
    )
    headers = dict(dlq.headers)
    assert dlq.value == msg.value  # type: ignore[attr-defined]
    assert headers["dlq-attempts"] == b"3" and headers["dlq-service"] == b"test"
    assert headers["dlq-origin-topic"] == topics.scoped(settings, topic).encode()
    assert headers["h"] == b"1"


async def test_a_failing_batch_is_retried_then_returned_for_one_by_one_delivery(
    settings: Settings,
) -> None:
    """`batch`: after the attempts nothing is dead-lettered and no terminal outcome recorded;
    the caller delivers the batch's events one by one."""
    topic = f"t.delivery.{uuid.uuid4().hex[:8]}"
    msg = await _one_message(settings, topic)
    calls: list[str] = []

    async def handler() -> None:
        calls.append("h")
        raise RuntimeError("one poison event")

    async def on_dead(reason: str) -> None:  # pragma: no cover - must not be called
        raise AssertionError(reason)

    async with bus_for(settings) as bus:
        got = await deliver(
            msg, handler, bus=bus, service="test", policy=FAST, on_dead=on_dead, batch=8
        )
    assert got == "failed" and len(calls) == 3
    assert (
        await collect(settings, topics.dlq(topic), until=lambda r: False, raw=True, timeout_s=2)
        == []
    )


async def test_transient_error_is_retried_and_not_dead_lettered(settings: Settings) -> None:
    topic = f"t.delivery.{uuid.uuid4().hex[:8]}"
    msg = await _one_message(settings, topic)
    calls: list[int] = []

    async def handler() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("blip")

    async def on_dead(reason: str) -> None:  # pragma: no cover - must not be called
        raise AssertionError(reason)

    async with bus_for(settings) as bus:
        assert (
            await deliver(msg, handler, bus=bus, service="test", policy=FAST, on_dead=on_dead)
            == "handled"
        )
    assert len(calls) == 3
    assert (
        await collect(settings, topics.dlq(topic), until=lambda r: False, raw=True, timeout_s=1.5)
        == []
    )


async def test_dead_letter_path_waits_for_its_terminal_outcome_and_stop_leaves_it_unacked(
    settings: Settings,
) -> None:
    """While the terminal outcome cannot be recorded (the database is down), `deliver` keeps
    trying; a stop meanwhile raises Stopped (the caller must not ack); nothing reached the DLQ."""
    topic = f"t.delivery.{uuid.uuid4().hex[:8]}"
    msg = await _one_message(settings, topic)
    stop = asyncio.Event()
    tries: list[int] = []

    async def handler() -> None:
        raise RuntimeError("boom")

    async def on_dead(reason: str) -> None:
        tries.append(1)
        if len(tries) == 4:
            stop.set()
        raise OSError("database down")

    async with bus_for(settings) as bus:
        with pytest.raises(Stopped):
            await deliver(
                msg, handler, bus=bus, service="test", policy=FAST, on_dead=on_dead, stop=stop
            )
    assert len(tries) == 4
    assert (
        await collect(settings, topics.dlq(topic), until=lambda r: False, raw=True, timeout_s=1.5)
        == []
    )


def test_policy_validates_and_backs_off() -> None:
    p = RetryPolicy(attempts=4, initial_s=0.5, max_s=1.5)
    assert [p.delay(i) for i in (1, 2, 3)] == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_s=2.0, max_s=1.0)


async def test_relay_sends_committed_messages_and_a_replay_sends_identical_bytes(
    settings: Settings,
    fresh_database_url: str,
) -> None:
    topic = f"t.outbox.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, {topic: 1})
    engine = make_engine(fresh_database_url)
    outbox.create_table(engine)
    from sqlalchemy.orm import Session

    msgs = [
        Message.encode(
            topic,
            "NodeHeartbeat",
            {
                "hospital_id": f"h{i}",
                "departments": ["x"],
                "queue_depth": i,
                "in_flight": 0,
                "recent_latency_ms": 0.0,
                "model": "m",
                "device": "cpu",
                "healthy": True,
                "sent_at_ms": 1000 + i,
            },
            key=f"h{i}",
        )
        for i in range(3)
    ]
    with Session(engine) as s, s.begin():
        outbox.add(s, msgs)
    with Session(engine) as s, s.begin():  # a rolled-back transaction leaves nothing to send
        outbox.add(s, [Message(topic, None, b"never", ())])
        s.rollback()
    producer = make_producer(settings)
    await producer.start()
    try:
        relay = outbox.Relay(engine, producer, namespace=settings.topic_namespace)
        assert await relay.flush() == 3
        assert await relay.flush() == 0  # acked and marked: nothing left
        # A crash between the broker's ack and the mark: the rows are unsent again.
        with Session(engine) as s, s.begin():
            s.execute(update(OutboxRow).values(sent_at_ms=None))
        assert await relay.flush() == 3
        assert outbox.purge_sent(engine, before_ms=time.time_ns() // 1_000_000 + 1000) == 3
        assert outbox.pending(engine) == []
    finally:
        await producer.stop()
        engine.dispose()
    got = await collect(settings, topic, until=lambda r: len(r) >= 6, raw=True, timeout_s=20)
    assert [m.value for m in got] == [m.value for m in msgs] * 2
    assert [m.key for m in got] == [m.key for m in msgs] * 2
    assert [list(m.headers) for m in got[:3]] == [list(m.headers) for m in got[3:]]


async def test_relay_marks_only_what_was_acked_when_a_page_fails(
    settings: Settings,
    fresh_database_url: str,
) -> None:
    """A page is sent pipelined; a message the producer refuses stops it there: what was acked
    before it is marked sent, it and the rest stay pending, and the error is raised."""
    from sqlalchemy.orm import Session

    topic = f"t.outbox.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, {topic: 1})
    engine = make_engine(fresh_database_url)
    outbox.create_table(engine)
    small = [Message(topic, f"k{i}".encode(), f"v{i}".encode(), ()) for i in range(3)]
    big = Message(topic, b"big", b"x" * 20_000, ())
    with Session(engine) as s, s.begin():
        outbox.add(s, [*small[:2], big, small[2]])
    producer = make_producer(settings, max_request_size=10_000)
    await producer.start()
    try:
        relay = outbox.Relay(engine, producer, namespace=settings.topic_namespace)
        with pytest.raises(Exception, match="(?i)size|large"):
            await relay.flush()
        assert [m.value for _, m in outbox.pending(engine)] == [big.value, small[2].value]
    finally:
        await producer.stop()
        engine.dispose()
    got = await collect(settings, topic, until=lambda r: len(r) >= 2, raw=True, timeout_s=20)
    assert [m.value for m in got] == [b"v0", b"v1"]

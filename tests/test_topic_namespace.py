"""The topic namespace (Settings.topic_namespace): empty = today's names; else every topic, and
every consumer group, is prefixed — through topics.scoped, Bus.send and make_consumer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pydantic
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from fedllm.common import audit, outbox, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_consumer


class Recorder:
    """Stands in for the aiokafka producer: records the topics it is asked to send to."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_and_wait(self, topic: str, **_: Any) -> None:
        self.sent.append(topic)

    async def send(self, topic: str, **_: Any) -> asyncio.Future[None]:
        self.sent.append(topic)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _event() -> dict[str, Any]:
    return audit.audit_event(service="test", action="namespace.check", id_parts=("1",))


def test_empty_namespace_keeps_the_production_names() -> None:
    s = Settings(kafka_bootstrap="127.0.0.1:1")
    assert s.topic_namespace == ""
    assert topics.scoped(s, topics.REQUESTS) == "fedllm.requests"
    assert topics.scoped(s, topics.hospital_requests("h1")) == "hospital.h1.requests"


async def test_namespace_prefixes_every_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLLM_TOPIC_NAMESPACE", "t42.")
    s = Settings(kafka_bootstrap="127.0.0.1:1")
    assert topics.scoped(s, topics.AUDIT) == "t42.fedllm.audit"
    assert topics.scoped(s, topics.reply_topic("alice")) == "t42.fedllm.replies.alice"
    consumer = make_consumer(s, topics.RESULTS, group_id="router")
    assert consumer.subscription() == {"t42.fedllm.results"}
    assert consumer._group_id == "t42.router"  # noqa: SLF001


def test_namespace_outside_the_topic_alphabet_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings(topic_namespace="no spaces/")


async def test_bus_and_outbox_send_inside_their_namespace(tmp_path: Path) -> None:
    producer = Recorder()
    await Bus(producer, "ns.").send(topics.AUDIT, "AuditEvent", _event())  # type: ignore[arg-type]
    assert producer.sent == ["ns.fedllm.audit"]

    engine = create_engine(f"sqlite:///{tmp_path / 'outbox.db'}")
    outbox.create_table(engine)
    with Session(engine) as s, s.begin():
        outbox.add(s, [outbox.Message.encode(topics.RESULTS, "AuditEvent", _event())])
    producer.sent.clear()
    assert await outbox.Relay(engine, producer, namespace="ns.").flush() == 1
    assert producer.sent == ["ns.fedllm.results"]  # stored logical, sent scoped

"""The topic namespace (Settings.topic_namespace): empty = today's names; else every topic, and
every consumer group, is prefixed — through topics.scoped, Bus.send and make_consumer."""

from __future__ import annotations

import ast
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


# --- the guard: every test on the real broker runs in its own namespace (issue #10 item 5) ---

TESTS = Path(__file__).parent
BOOTSTRAP_KEYWORDS = {"kafka_bootstrap", "KAFKA_BOOTSTRAP"}


def _callee(call: ast.Call) -> str:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def unscoped_calls(source: str) -> list[tuple[int, str]]:
    """(line, why) for each call in a test module's `source` that would put a test on the
    broker's shared, unprefixed topics:

    - a `…Settings(` given a kafka bootstrap that is not a literal (a literal is an unreachable
      stand-in: no broker) and no `topic_namespace`;
    - a `Bus(producer)` or an outbox `Relay(engine, producer)` with no namespace."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name, kw = _callee(node), {k.arg: k.value for k in node.keywords}
        if name.endswith("Settings") and "topic_namespace" not in kw:
            broker = [v for k, v in kw.items() if k in BOOTSTRAP_KEYWORDS]
            if broker and not isinstance(broker[0], ast.Constant):
                out.append((node.lineno, f"{name}(…) on the broker without topic_namespace"))
        elif name == "Bus" and len(node.args) < 2 and "namespace" not in kw:
            out.append((node.lineno, "Bus(producer) without the settings' namespace"))
        elif name == "Relay" and "namespace" not in kw:
            out.append((node.lineno, "outbox.Relay(…) without the settings' namespace"))
    return out


def test_the_guard_sees_an_unscoped_test() -> None:
    bad = (
        "s = Settings(kafka_bootstrap=kafka_bootstrap, data_dir=d)\n"
        "bus = Bus(producer)\n"
        "relay = outbox.Relay(engine, producer)\n"
    )
    assert [line for line, _ in unscoped_calls(bad)] == [1, 2, 3]
    good = (
        "s = Settings(kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace())\n"
        "t = Settings(kafka_bootstrap='127.0.0.1:1')\n"
        "bus = Bus(producer, s.topic_namespace)\n"
        "relay = outbox.Relay(engine, producer, namespace=s.topic_namespace)\n"
    )
    assert unscoped_calls(good) == []


def test_every_broker_test_runs_in_its_own_topic_namespace() -> None:
    """Build broker Settings with `topic_namespace=unique_namespace()` (tests/kafka_helpers),
    `Bus(producer, settings.topic_namespace)`, and wrap raw topic names handed to aiokafka in
    `topics.scoped(settings, …)`: no test then reads or writes another's traffic."""
    found = [
        f"{path.relative_to(TESTS.parent)}:{line}: {why}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, why in unscoped_calls(path.read_text(encoding="utf-8"))
    ]
    assert not found, "\n".join(found)

"""The auditor against the real broker: store, commit after the DB, dead-letter, replay."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiokafka import TopicPartition
from sqlalchemy import Engine, func, select

from fedllm.common import topics
from fedllm.common.audit import emit
from fedllm.common.config import Settings
from fedllm.common.db import make_engine
from fedllm.common.kafka import Bus, ensure_topics, make_consumer, make_producer
from fedllm.common.lifecycle import ready_path
from fedllm.services.auditor import cli, service
from fedllm.services.auditor.replay import replay
from fedllm.services.auditor.rows import Protection
from fedllm.services.auditor.settings import AuditorSettings
from fedllm.services.auditor.tables import audit_log
from fedllm.services.auditor.verify import verify
from tests.auditor.helpers import NO_KEYS, as_superuser_untriggered
from tests.kafka_helpers import collect, unique_namespace

pytestmark = pytest.mark.asyncio(loop_scope="session")


def make_settings(bootstrap: str, db_url: str, data_dir: Path, namespace: str) -> Settings:
    """Auditor settings in the test's topic namespace (the `namespace` fixture's, as `bus`)."""
    return Settings(
        KAFKA_BOOTSTRAP=bootstrap,
        topic_namespace=namespace,
        DATABASE_URL=db_url,
        data_dir=data_dir,
        session_timeout_ms=6_000,
    )


async def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(cond):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def count(engine: Engine, tag: str | None = None) -> int:
    q = select(func.count()).select_from(audit_log)
    if tag:
        q = q.where(audit_log.c.request_id.like(f"{tag}%"))
    with engine.connect() as conn:
        return int(conn.scalar(q) or 0)


class Running:
    """An auditor task with its own consumer group (so earlier tests' commits don't matter)."""

    def __init__(self, settings: Settings, group: str) -> None:
        self.settings, self.stop = settings, asyncio.Event()
        self.cfg = AuditorSettings(group_id=group)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(service.run(self.settings, stop=self.stop, cfg=self.cfg))
        deadline = time.monotonic() + 30
        while not ready_path(self.settings, "auditor").exists():
            assert not self.task.done(), self.task
            assert time.monotonic() < deadline, "auditor not ready in 30 s"
            await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
def namespace() -> str:
    """The test's own topic namespace: its audit topic holds only its events."""
    return unique_namespace()


@pytest_asyncio.fixture(loop_scope="session")
async def bus(kafka_bootstrap: str, namespace: str) -> AsyncIterator[Bus]:
    s = Settings(KAFKA_BOOTSTRAP=kafka_bootstrap, topic_namespace=namespace)
    await ensure_topics(s, topics.all_topics([]))
    producer = make_producer(s)
    await producer.start()
    yield Bus(producer, namespace)
    await producer.stop()


async def emit_many(bus: Bus, tag: str, n: int, start: int = 0, **kw: Any) -> None:
    for i in range(start, start + n):
        await emit(
            bus,
            action="request.received",
            service="gateway",
            id_parts=(tag, i),
            request_id=f"{tag}-{i}",
            user_id="u1",
            role="clinician",
            department="cardiology",
            hospital_id="st_mary",
            **kw,
        )


async def committed_offset(settings: Settings, group: str) -> int | None:
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topics.scoped(settings, topics.AUDIT), 0))
    finally:
        await consumer.stop()


async def test_stores_commits_dead_letters_and_replays(
    bus: Bus, namespace: str, kafka_bootstrap: str, fresh_database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap, fresh_database_url, tmp_path, namespace)
    engine = make_engine(fresh_database_url)
    tag, group = f"svc-{uuid.uuid4().hex[:8]}", f"auditor-test-{uuid.uuid4().hex[:8]}"
    async with Running(settings, group):
        await emit_many(bus, tag, 40, prompt="free text that must not be stored")
        await emit_many(bus, tag, 10)  # replayed events: same ids
        garbage = uuid.uuid4().hex.encode()
        await bus.producer.send_and_wait(
            topics.scoped(settings, topics.AUDIT), value=garbage, headers=[("fedllm-fp", b"nope")]
        )
        await bus.send(
            topics.AUDIT,
            "AuditEvent",
            {"event_id": "", "action": "x", "service": "t", "occurred_at_ms": 0},
        )
        await emit_many(bus, tag, 20, start=40)  # after the bad ones: the service kept going
        await wait_for(lambda: count(engine, tag) == 60, what="60 stored rows")
        await asyncio.sleep(0.5)
        assert count(engine, tag) == 60
    with engine.connect() as conn:
        flat = str(conn.execute(select(audit_log)).all())
    assert "free text" not in flat
    assert verify(engine).ok
    # Offsets were committed past everything stored (the last message is ours).
    with engine.connect() as conn:
        last = conn.scalar(select(func.max(audit_log.c.source_offset)))
    assert await committed_offset(settings, group) == last + 1
    dlq = await collect(
        settings,
        topics.dlq(topics.AUDIT),
        raw=True,
        timeout_s=20,
        until=lambda ms: sum(m.value == garbage for m in ms) >= 1,
    )
    mine = [m for m in dlq if m.value == garbage]
    assert len(mine) == 1 and dict(mine[0].headers)["dlq-service"] == b"auditor"
    assert any(b"invalid AuditEvent" in dict(m.headers)["dlq-error"] for m in dlq)

    # A restart with the same group resumes at the committed offset and stores nothing twice.
    async with Running(settings, group):
        await emit_many(bus, tag, 5, start=60)
        await wait_for(lambda: count(engine, tag) == 65, what="65 stored rows")
    assert count(engine, tag) == 65 and verify(engine).ok

    # Replay from offset 0 into an empty DB: row for row the same store, same hashes.
    target = make_engine(f"sqlite:///{tmp_path / 'replay.db'}")
    rep = await replay(
        settings, live=engine, target=target, protection=NO_KEYS, from_offset=0, idle_s=1.0
    )
    assert rep.ok, rep.lines()
    assert rep.hashes_identical and rep.undecodable == 2 and not rep.purged_in_live
    assert count(target, tag) == 65

    # Tampering with the live store shows up as a mismatch.
    with engine.connect() as conn:
        seq = conn.scalar(select(audit_log.c.seq).where(audit_log.c.request_id == f"{tag}-3"))
    as_superuser_untriggered(
        engine, "UPDATE audit_log SET outcome = 'forged' WHERE seq = :s", s=seq
    )
    as_superuser_untriggered(engine, "DELETE FROM audit_log WHERE request_id = :r", r=f"{tag}-7")
    target2 = make_engine(f"sqlite:///{tmp_path / 'replay2.db'}")
    rep2 = await replay(
        settings, live=engine, target=target2, protection=NO_KEYS, from_offset=0, idle_s=1.0
    )
    assert not rep2.ok and len(rep2.differing) == 1 and len(rep2.missing_in_live) == 1

    # The CLI: `audit replay --from-time` into a non-empty DB is refused; into an empty one runs.
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))

    def run_cli(*argv: str) -> int:
        args = parser.parse_args(list(argv))
        return int(args.func(args))

    env = {
        "KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FEDLLM_TOPIC_NAMESPACE": namespace,
        "DATABASE_URL": fresh_database_url,
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert (
            await asyncio.to_thread(
                run_cli,
                "audit",
                "replay",
                "--from-offset",
                "0",
                "--database-url",
                f"sqlite:///{tmp_path / 'replay.db'}",
            )
            == 2
        )
        assert await asyncio.to_thread(run_cli, "audit", "verify") == 1
        assert (
            await asyncio.to_thread(
                run_cli,
                "audit",
                "replay",
                "--from-time",
                "2000-01-01T00:00:00Z",
                "--idle",
                "1",
                "--database-url",
                f"sqlite:///{tmp_path / 'replay3.db'}",
            )
            == 1
        )  # tampered live


async def test_replay_from_time_covers_only_the_window(
    bus: Bus, namespace: str, kafka_bootstrap: str, fresh_database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(kafka_bootstrap, fresh_database_url, tmp_path, namespace)
    engine = make_engine(fresh_database_url)
    tag = f"win-{uuid.uuid4().hex[:8]}"
    async with Running(settings, f"auditor-test-{uuid.uuid4().hex[:8]}"):
        await emit_many(bus, tag, 10)
        await asyncio.sleep(1.1)
        from datetime import UTC, datetime

        cut = datetime.now(UTC)
        await asyncio.sleep(0.1)
        await emit_many(bus, tag, 10, start=10)
        await wait_for(lambda: count(engine, tag) == 20, what="20 stored rows")
    target = make_engine(f"sqlite:///{tmp_path / 'window.db'}")
    rep = await replay(
        settings,
        live=engine,
        target=target,
        protection=Protection(None, None),
        from_time=cut,
        idle_s=1.0,
    )
    assert rep.ok, rep.lines()
    assert count(target, tag) == 10 and rep.live_rows_compared == 10
    assert rep.hashes_identical is None  # a window: chain positions differ, contents match

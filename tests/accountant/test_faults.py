"""Injected faults against the real accountant process, broker and Postgres: a handler that
raises, the database taken away, a crash between the ledger commit and the send (outbox)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fedllm.common import topics
from fedllm.common.config import HospitalConfig
from fedllm.common.db import normalise_url
from fedllm.common.outbox import Message
from fedllm.launcher import Pipeline
from tests.kafka_helpers import collect, inference_request, produce, unique_namespace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def accountant(
    kafka_bootstrap: str, postgres_admin_url: str, tmp_path_factory
) -> Iterator[Pipeline]:
    from tests.conftest import scratch_database

    with scratch_database(postgres_admin_url) as db:
        pipe = Pipeline(
            data_dir=Path(tmp_path_factory.mktemp("faults")),
            database_url=db,
            hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
            env={
                "FEDLLM_TOPIC_NAMESPACE": unique_namespace(),  # its own topics
                "FEDLLM_DELIVERY_ATTEMPTS": "3",
                "FEDLLM_DELIVERY_BACKOFF_S": "0.1",
                "FEDLLM_DELIVERY_BACKOFF_MAX_S": "0.5",
            },
        )
        pipe.bootstrap = kafka_bootstrap
        pipe.start_broker()
        pipe.start_service("accountant", ["accountant"])
        try:
            pipe.wait_ready(["accountant"], timeout_s=120)
            yield pipe
        finally:
            pipe.stop()


def _sql(url: str, sql: str, **params: object) -> list[tuple]:
    engine = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            result = conn.execute(text(sql), params)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _admin_url(db_url: str) -> str:
    return (
        make_url(normalise_url(db_url))
        .set(database="postgres")
        .render_as_string(hide_password=False)
    )


def take_database_away(db_url: str) -> None:
    name = make_url(normalise_url(db_url)).database
    admin = _admin_url(db_url)
    _sql(admin, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    _sql(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n", n=name)


def give_database_back(db_url: str) -> None:
    name = make_url(normalise_url(db_url)).database
    _sql(_admin_url(db_url), f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


async def terminal(pipe: Pipeline, rid: str, *, timeout_s: float = 60) -> list[dict]:
    """Every terminal result for `rid` (waits for the first, then 1 s for duplicates)."""
    s = pipe.settings
    await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == rid for x in r),
        timeout_s=timeout_s,
    )
    await asyncio.sleep(1.0)
    finals = await collect(s, topics.RESULTS, until=lambda r: False, timeout_s=2)
    return [x for x in finals if x["request_id"] == rid]


async def audit_actions(pipe: Pipeline, rid: str) -> list[str]:
    events = await collect(pipe.settings, topics.AUDIT, until=lambda r: False, timeout_s=2)
    return sorted(
        {(a["event_id"], a["action"]) for a in events if a["request_id"] == rid}, key=lambda x: x[1]
    )


def poison_user(db_url: str, user_id: str) -> None:
    """Make every budget-account write of `user_id` fail in Postgres (an injected fault the
    accountant cannot retry away; its failure path writes no account row)."""
    _sql(
        db_url,
        f"""
        CREATE OR REPLACE FUNCTION poison_account() RETURNS trigger AS $$
        BEGIN
            IF NEW.scope = 'user\\:{user_id}' THEN
                RAISE EXCEPTION 'injected fault for %', NEW.scope;
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql""",
    )
    _sql(db_url, "DROP TRIGGER IF EXISTS poison ON budget_accounts")
    _sql(
        db_url,
        "CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON budget_accounts "
        "FOR EACH ROW EXECUTE FUNCTION poison_account()",
    )


async def test_a_handler_error_is_retried_then_failed_refunded_and_dead_lettered(
    accountant: Pipeline,
) -> None:
    """A poison request fails its batch: the batch's events are delivered one by one, the
    poison one ends failed (refunded, dead-lettered) and the others are handled."""
    poison_user(accountant.database_url, "poison-user")
    try:
        poison = inference_request(user_id="poison-user", epsilon=1.0)
        await produce(
            accountant.settings, topics.REQUESTS, "InferenceRequest", poison, key=poison["user_id"]
        )
        ok = inference_request(user_id="after-poison", epsilon=1.0)  # in its batch, or after
        await produce(
            accountant.settings, topics.REQUESTS, "InferenceRequest", ok, key=ok["user_id"]
        )
        (final,) = await terminal(accountant, poison["request_id"])
    finally:
        _sql(accountant.database_url, "DROP TRIGGER IF EXISTS poison ON budget_accounts")
    assert final["status"] == "failed" and "not processed after 3 attempts" in final["reason"]
    assert final["privacy_cost"] == 0.0
    dead = await collect(
        accountant.settings,
        topics.dlq(topics.REQUESTS),
        until=lambda r: any(dict(m.headers).get("dlq-attempts") == b"3" for m in r),
        raw=True,
        timeout_s=30,
    )
    assert any(dict(m.headers)["dlq-attempts"] == b"3" for m in dead)
    assert [a for _, a in await audit_actions(accountant, poison["request_id"])] == [
        "request.failed"
    ]
    rows = _sql(
        accountant.database_url,
        "SELECT state, outcome, spent_epsilon FROM budget_entries WHERE request_id = :r",
        r=poison["request_id"],
    )
    assert rows == [("rejected", "failed", 0.0)]
    decisions = await collect(
        accountant.settings,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == ok["request_id"] for d in r),
        timeout_s=30,
    )
    assert [d["approved"] for d in decisions if d["request_id"] == ok["request_id"]] == [True]


async def test_a_database_outage_loses_no_request_and_does_not_stop_the_accountant(
    accountant: Pipeline,
) -> None:
    """Before: faust acked the event whose handler raised, so the request vanished (no row,
    no decision, no terminal result). Now it ends in exactly one terminal state once the
    database is back, and the expiry sweep's errors during the outage are survived."""
    s = accountant.settings
    take_database_away(accountant.database_url)
    try:
        lost = inference_request(user_id="outage-user", epsilon=1.0)
        await produce(s, topics.REQUESTS, "InferenceRequest", lost, key=lost["user_id"])
        # > the handler's 3 attempts (0.3 s): the dead-letter path now waits for the database
        during = await collect(s, topics.RESULTS, until=lambda r: False, timeout_s=3)
        assert not any(x["request_id"] == lost["request_id"] for x in during)
    finally:
        give_database_back(accountant.database_url)
    finals = await terminal(accountant, lost["request_id"])
    assert len(finals) == 1 and finals[0]["status"] == "failed"
    assert "not processed after 3 attempts" in finals[0]["reason"]
    actions = [a for _, a in await audit_actions(accountant, lost["request_id"])]
    assert actions == ["request.failed"]
    log = (accountant.data_dir / "logs" / "accountant.log").read_text()
    assert "expiry sweep failed" in log  # the timer met the outage and the process lived on
    later = inference_request(user_id="outage-user", epsilon=1.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", later, key=later["user_id"])
    decisions = await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == later["request_id"] for d in r),
        timeout_s=60,
    )
    assert [d["approved"] for d in decisions if d["request_id"] == later["request_id"]] == [True]


async def test_outbox_rows_left_unsent_by_a_crash_are_relayed(accountant: Pipeline) -> None:
    """A crash after the ledger commit leaves the outbox rows unsent: the relay sends them."""
    from sqlalchemy.orm import Session

    from fedllm.common import outbox

    marker = f"outbox-{time.time_ns()}"
    record = {
        "user_id": marker,
        "department": "cardiology",
        "window_start": 0,
        "window_seconds": 86400,
        "delta": 1e-5,
        "user_limit_epsilon": 10.0,
        "user_spent_epsilon": 0.0,
        "user_remaining_epsilon": 10.0,
        "department_limit_epsilon": 15.0,
        "department_remaining_epsilon": 15.0,
        "updated_at_ms": 1,
    }
    message = Message.encode(topics.BUDGETS, "BudgetStatus", record, key=marker)
    engine = create_engine(normalise_url(accountant.database_url))
    with Session(engine) as s, s.begin():
        outbox.add(s, [message])
    engine.dispose()
    got = await collect(
        accountant.settings,
        topics.BUDGETS,
        until=lambda r: any(m.key == marker.encode() for m in r),
        raw=True,
        timeout_s=20,
    )
    (sent,) = [m for m in got if m.key == marker.encode()]
    assert sent.value == message.value

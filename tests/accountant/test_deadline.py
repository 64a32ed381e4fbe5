"""The deadline rule (docs/reliability.md), on the real ledger (Postgres) and the real broker:
the first terminal transition wins. An answer that reaches the accountant while its reservation
is open is charged and delivered, even past the deadline; once the sweep has timed the request
out (refunded), a later answer is refused: not charged, not delivered, audited."""

from __future__ import annotations

import uuid

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from sqlalchemy.orm import Session

from fedllm.common import codec, topics
from fedllm.common.config import HospitalConfig, Settings
from fedllm.common.db import make_engine
from fedllm.common.identity import mint_token
from fedllm.common.kafka import Bus, ensure_topics, make_producer, now_ms
from fedllm.common.outbox import OutboxRow
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.services.accountant.handlers import Accountant
from fedllm.services.accountant.ledger import Ledger
from tests.kafka_helpers import collect, credential_headers, inference_request, unique_namespace

pytestmark = pytest.mark.asyncio(loop_scope="session")


def ok_answer(req: dict) -> dict:
    curve = PrivacyCurve.from_rho(0.001)
    return {
        "request_id": req["request_id"],
        "user_id": req["user_id"],
        "department": req["department"],
        "status": "ok",
        "reason": "",
        "response": "an answer",
        "node_id": "h1",
        "attempt": 1,
        "is_private": True,
        "privacy_cost": curve.epsilon(delta=1e-5),
        "delta": 1e-5,
        "rdp_orders": list(curve.orders),
        "rdp_epsilons": list(curve.values),
        "tokens": 3,
        "records_used": 4,
        "finished_at_ms": now_ms(),
    }


async def reserve(acct: Accountant, req: dict) -> None:
    """Reserve `req` as its user would send it (with their credential)."""
    token = mint_token(
        acct.settings, user_id=req["user_id"], role=req["role"], department=req["department"]
    )
    await acct.on_request(req, credential_headers(token))
    assert acct.ledger.entry(req["request_id"])["state"] == "reserved"


def terminal_rows(engine, rid: str) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The outbox's terminal results for `rid` (fedllm.results is keyed by request id)."""
    with Session(engine) as s:
        return [
            r.value
            for r in s.query(OutboxRow).filter(
                OutboxRow.topic == topics.RESULTS, OutboxRow.key == rid.encode()
            )
        ]


async def test_late_answer_before_the_sweep_is_charged_and_after_it_is_refused(
    kafka_bootstrap: str,
    fresh_database_url: str,
) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        database_url=fresh_database_url,
        mode="demo",
        hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
    )
    await ensure_topics(settings, topics.all_topics(["h1"]))
    engine = make_engine(fresh_database_url)
    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        acct = Accountant(settings, Ledger(engine, settings.budget, RdpAccountant()), bus)
        user = f"deadline-{uuid.uuid4().hex[:6]}"
        past = now_ms() - 10_000
        # 1. Past its deadline, the sweep has not run yet: the answer is charged and delivered.
        late = inference_request(user_id=user, epsilon=1.0, deadline_ms=past)
        await reserve(acct, late)
        await acct.on_node_result(ok_answer(late))
        assert acct.ledger.entry(late["request_id"])["state"] == "committed"
        assert await acct.sweep_expired(grace_ms=0) == 0  # nothing open to time out
        # 2. The sweep got there first: refunded; the answer that follows is refused.
        swept = inference_request(user_id=user, epsilon=1.0, deadline_ms=past)
        await reserve(acct, swept)
        assert await acct.sweep_expired(grace_ms=0) == 1
        await acct.on_node_result(ok_answer(swept))
        entry = acct.ledger.entry(swept["request_id"])
        assert (entry["state"], entry["outcome"], entry["spent_epsilon"]) == (
            "refunded",
            "timeout",
            0.0,
        )
        assert len(terminal_rows(engine, late["request_id"])) == 1
        assert len(terminal_rows(engine, swept["request_id"])) == 1
    finally:
        await producer.stop()
        engine.dispose()
    results = await collect(
        settings,
        topics.RESULTS,
        until=lambda r: {late["request_id"], swept["request_id"]} <= {x["request_id"] for x in r},
        timeout_s=30,
    )
    by_id = {
        (x["request_id"], x["status"])
        for x in results
        if x["request_id"] in (late["request_id"], swept["request_id"])
    }
    assert by_id == {(late["request_id"], "ok"), (swept["request_id"], "timeout")}
    events = await collect(
        settings,
        topics.AUDIT,
        until=lambda r: any(
            a["action"] == "result.refused_late" and a["request_id"] == swept["request_id"]
            for a in r
        ),
        timeout_s=30,
    )
    refused = [
        a
        for a in events
        if a["action"] == "result.refused_late" and a["request_id"] == swept["request_id"]
    ]
    assert refused and refused[0]["epsilon"] == 0.0


async def test_parts_released_before_a_router_crash_are_charged_when_the_sweep_ends_it(
    kafka_bootstrap: str,
    fresh_database_url: str,
) -> None:
    """The router died holding two answered fan-out parts: the sweep charges them (composed)
    instead of refunding, and a replayed part is counted once."""
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        database_url=fresh_database_url,
        mode="demo",
        hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
    )
    await ensure_topics(settings, topics.all_topics(["h1"]))
    engine = make_engine(fresh_database_url)
    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        acct = Accountant(settings, Ledger(engine, settings.budget, RdpAccountant()), bus)
        req = inference_request(
            user_id=f"fan-{uuid.uuid4().hex[:6]}", epsilon=2.0, deadline_ms=now_ms() - 10_000
        )
        await reserve(acct, req)
        part = PrivacyCurve.from_rho(0.002)
        for node in ("h1", "h2", "h1"):  # h1's part delivered twice
            await acct.on_node_result(
                dict(
                    ok_answer(req),
                    status="partial",
                    node_id=node,
                    rdp_orders=list(part.orders),
                    rdp_epsilons=list(part.values),
                )
            )
        assert acct.ledger.entry(req["request_id"])["state"] == "reserved"
        assert await acct.sweep_expired(grace_ms=0) == 1
        entry = acct.ledger.entry(req["request_id"])
        both = acct.ledger.accountant.compose(part, part)
        assert (entry["state"], entry["outcome"]) == ("committed", "timeout")
        assert entry["spent_epsilon"] == pytest.approx(both.epsilon(delta=1e-5))
    finally:
        await producer.stop()
        engine.dispose()


def outbox_results(engine, rid: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The terminal results the outbox holds for `rid`, decoded."""
    with Session(engine) as s:
        rows = (
            s.query(OutboxRow)
            .filter(OutboxRow.topic == topics.RESULTS, OutboxRow.key == rid.encode())
            .all()
        )
        return [
            codec.decode_expect(
                "InferenceResult", r.value, [(k, bytes.fromhex(v)) for k, v in r.headers]
            )
            for r in rows
        ]


async def test_a_node_failure_after_its_mechanism_started_is_charged_at_once(
    kafka_bootstrap: str,
    fresh_database_url: str,
) -> None:
    """A node failure with no spend waits for the router's verdict; one that reports a spent
    curve (a mechanism started, e.g. fail-closed mid-release) is settled failed and charged
    that curve right away, once, whatever arrives after it."""
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        database_url=fresh_database_url,
        mode="demo",
        hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
    )
    await ensure_topics(settings, topics.all_topics(["h1"]))
    engine = make_engine(fresh_database_url)
    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        acct = Accountant(settings, Ledger(engine, settings.budget, RdpAccountant()), bus)
        req = inference_request(user_id=f"fail-{uuid.uuid4().hex[:6]}", epsilon=1.0)
        await reserve(acct, req)
        failed = dict(
            ok_answer(req),
            status="failed",
            response="",
            is_private=False,
            reason="node unavailable",
            rdp_orders=[],
            rdp_epsilons=[],
        )
        await acct.on_node_result(failed)  # nothing was released: the router retries
        assert acct.ledger.entry(req["request_id"])["state"] == "reserved"
        spent = PrivacyCurve.from_rho(0.0005)
        started = dict(
            failed,
            attempt=2,
            reason="fail-closed: temperature out of range",
            rdp_orders=list(spent.orders),
            rdp_epsilons=list(spent.values),
        )
        await acct.on_node_result(started)
        await acct.on_node_result(started)  # a replay
        await acct.on_node_result(dict(failed, node_id="", reason="router gave up"))
        entry = acct.ledger.entry(req["request_id"])
        expected = DpRdpAccountant(orders=list(spent.orders))
        expected.compose(dp_event.ZCDpEvent(0.0005))
        assert (entry["state"], entry["outcome"], entry["node_id"]) == ("committed", "failed", "h1")
        assert entry["spent_epsilon"] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-9)
        (final,) = outbox_results(engine, req["request_id"])
        assert final["status"] == "failed" and final["response"] == ""
        assert final["privacy_cost"] == pytest.approx(entry["spent_epsilon"])
        assert "fail-closed" in final["reason"]
        # A spend on orders the ledger does not know still means a mechanism ran: the whole
        # reservation is charged at once.
        odd = inference_request(user_id=req["user_id"], epsilon=1.0)
        await reserve(acct, odd)
        await acct.on_node_result(
            dict(started, request_id=odd["request_id"], rdp_orders=[3.0], rdp_epsilons=[0.01])
        )
        entry = acct.ledger.entry(odd["request_id"])
        assert (entry["state"], entry["outcome"]) == ("committed", "failed")
        assert entry["spent_rdp"] == entry["reserved_rdp"]
    finally:
        await producer.stop()
        engine.dispose()

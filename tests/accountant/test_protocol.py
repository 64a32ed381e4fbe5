"""The accountant's side of the node-results protocol, on the real ledger (Postgres) and the
real broker: it reads record kinds (a part never settles a request, a router verdict does
whatever node it names), the ρ it reserved travels on its decision, and a refused request
ends here with a terminal result in the outbox and no decision the router could act on."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.orm import Session

from fedllm.common import codec, topics
from fedllm.common.config import BudgetConfig, HospitalConfig, Settings
from fedllm.common.db import make_engine
from fedllm.common.kafka import Bus, ensure_topics, make_producer
from fedllm.common.outbox import OutboxRow
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.services.accountant.handlers import Accountant
from fedllm.services.accountant.ledger import Ledger
from tests.accountant.test_deadline import ok_answer, reserve
from tests.kafka_helpers import inference_request, unique_namespace

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def acct(kafka_bootstrap: str, fresh_database_url: str) -> AsyncIterator[Accountant]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        database_url=fresh_database_url,
        mode="demo",
        hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
        budget=BudgetConfig(user_epsilon=1.2),
    )
    await ensure_topics(settings, topics.all_topics(["h1"]))
    engine = make_engine(fresh_database_url)
    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        yield Accountant(settings, Ledger(engine, settings.budget, RdpAccountant()), bus)
    finally:
        await producer.stop()
        engine.dispose()


def outbox(acct: Accountant, topic: str, schema: str, rid: str) -> list[dict]:
    """What the outbox holds on `topic` for request `rid`, decoded."""
    with Session(acct.ledger.engine) as s:
        rows = s.query(OutboxRow).filter(OutboxRow.topic == topic).all()
        decoded = [
            codec.decode_expect(schema, r.value, [(k, bytes.fromhex(v)) for k, v in r.headers])
            for r in rows
        ]
    return [d for d in decoded if d["request_id"] == rid]


def spend(req: dict, rho: float, **kw: object) -> dict:
    curve = PrivacyCurve.from_rho(rho)
    return dict(
        ok_answer(req),
        status="failed",
        response="",
        is_private=False,
        reason="boom",
        rdp_orders=list(curve.orders),
        rdp_epsilons=list(curve.values),
        **kw,
    )


async def test_the_decision_carries_the_reserved_rho(acct: Accountant) -> None:
    req = inference_request(user_id=f"rho-{uuid.uuid4().hex[:6]}", epsilon=1.0)
    await reserve(acct, req)
    (decision,) = outbox(acct, topics.DECISIONS, "BudgetDecision", req["request_id"])
    entry = acct.ledger.entry(req["request_id"])
    assert decision["approved"] and decision["reserved_rho"] > 0
    assert decision["reserved_rho"] == RdpAccountant().query_rho(epsilon=1.0, delta=1e-5)
    # exactly the reserved curve's ρ: a node spending it is charged the reservation
    reserved = PrivacyCurve.from_dict(entry["reserved_rdp"])
    assert PrivacyCurve.from_rho(decision["reserved_rho"], reserved.orders) == reserved


async def test_refusals_end_at_the_accountant(acct: Accountant) -> None:
    user = f"refused-{uuid.uuid4().hex[:6]}"
    await reserve(acct, inference_request(user_id=user, epsilon=1.0))
    over = inference_request(user_id=user, epsilon=1.0)  # two compose to ε 1.46 > 1.2
    await reserve_refused(acct, over)
    (decision,) = outbox(acct, topics.DECISIONS, "BudgetDecision", over["request_id"])
    assert not decision["approved"] and decision["reserved_rho"] == 0.0
    (final,) = outbox(acct, topics.RESULTS, "InferenceResult", over["request_id"])
    assert (final["status"], final["kind"]) == ("rejected", "final")
    assert "budget exhausted" in final["reason"]

    # A refused credential: no decision at all, the terminal result and audit in the outbox.
    bad = inference_request(user_id=user, epsilon=1.0)
    await acct.on_request(bad, None)
    assert acct.ledger.entry(bad["request_id"]) is None
    assert outbox(acct, topics.DECISIONS, "BudgetDecision", bad["request_id"]) == []
    (final,) = outbox(acct, topics.RESULTS, "InferenceResult", bad["request_id"])
    assert (final["status"], final["kind"]) == ("rejected", "final")
    actions = {a["action"] for a in outbox(acct, topics.AUDIT, "AuditEvent", bad["request_id"])}
    assert actions == {"auth.failed", "request.rejected"}


async def reserve_refused(acct: Accountant, req: dict) -> None:
    from fedllm.common.identity import mint_token
    from tests.kafka_helpers import credential_headers

    token = mint_token(
        acct.settings, user_id=req["user_id"], role=req["role"], department=req["department"]
    )
    await acct.on_request(req, credential_headers(token))
    assert acct.ledger.entry(req["request_id"])["state"] == "rejected"


async def test_a_part_never_settles_and_the_routers_verdict_does(acct: Accountant) -> None:
    user = f"part-{uuid.uuid4().hex[:6]}"
    req = inference_request(user_id=user, epsilon=1.0)
    await reserve(acct, req)
    # A part that spent and then failed: kept for the sweep, but the router has the last word.
    await acct.on_node_result(spend(req, 0.001, kind="part"))
    await acct.on_node_result(dict(ok_answer(req), status="partial", node_id="h2", kind="part"))
    assert acct.ledger.entry(req["request_id"])["state"] == "reserved"
    # The router's verdict, naming the hospital it concerns: the kind says it is terminal.
    await acct.on_node_result(spend(req, 0.002, kind="verdict"))
    entry = acct.ledger.entry(req["request_id"])
    assert (entry["state"], entry["outcome"]) == ("committed", "failed")
    assert entry["spent_epsilon"] == pytest.approx(
        PrivacyCurve.from_rho(0.002).epsilon(delta=1e-5), rel=1e-9
    )
    (final,) = outbox(acct, topics.RESULTS, "InferenceResult", req["request_id"])
    assert final["kind"] == "final" and final["status"] == "failed"


async def test_a_failed_part_that_spent_is_charged_by_the_sweep(acct: Accountant) -> None:
    """The router died after a part failed mid-mechanism: the sweep charges that spend."""
    from fedllm.common.kafka import now_ms

    req = inference_request(
        user_id=f"sweep-{uuid.uuid4().hex[:6]}", epsilon=1.0, deadline_ms=now_ms() - 10_000
    )
    await reserve(acct, req)
    await acct.on_node_result(spend(req, 0.001, kind="part"))
    assert acct.ledger.entry(req["request_id"])["state"] == "reserved"
    assert await acct.sweep_expired(grace_ms=0) == 1
    entry = acct.ledger.entry(req["request_id"])
    assert (entry["state"], entry["outcome"]) == ("committed", "timeout")
    assert entry["spent_epsilon"] == pytest.approx(
        PrivacyCurve.from_rho(0.001).epsilon(delta=1e-5), rel=1e-9
    )

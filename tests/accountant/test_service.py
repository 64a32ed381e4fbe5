"""The faust accountant as a real process on the real broker and real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from fedllm.common import topics
from fedllm.common.config import HospitalConfig
from fedllm.common.db import normalise_url
from fedllm.common.kafka import now_ms
from fedllm.launcher import Pipeline
from fedllm.privacy.accountant import PrivacyCurve
from tests.kafka_helpers import collect, inference_request, produce, produce_raw, unique_namespace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def accountant(
    kafka_bootstrap: str, postgres_admin_url: str, tmp_path_factory
) -> Iterator[Pipeline]:
    from tests.conftest import scratch_database

    with scratch_database(postgres_admin_url) as db:
        pipe = Pipeline(
            data_dir=Path(tmp_path_factory.mktemp("acct")),
            database_url=db,
            hospitals=[HospitalConfig(id="h1", departments=["cardiology"])],
            env={"FEDLLM_TOPIC_NAMESPACE": unique_namespace()},  # its own topics
        )
        pipe.bootstrap = kafka_bootstrap
        pipe.start_broker()
        pipe.start_service("accountant", ["accountant"])
        try:
            pipe.wait_ready(["accountant"], timeout_s=120)
            yield pipe
        finally:
            pipe.stop()


def ledger_rows(pipe: Pipeline, request_id: str) -> list[tuple[str, float]]:
    engine = create_engine(normalise_url(pipe.database_url))
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT state, spent_epsilon FROM budget_entries WHERE request_id = :r"),
            {"r": request_id},
        ).all()
    engine.dispose()
    return [(r[0], r[1]) for r in rows]


def node_result(req: dict, *, status: str = "ok", curve: PrivacyCurve | None = None) -> dict:
    curve = curve or PrivacyCurve.from_rho(0.001)
    return {
        "request_id": req["request_id"],
        "user_id": req["user_id"],
        "department": req["department"],
        "status": status,
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
        "model_time_ms": 1.0,
        "processing_time_ms": 2.0,
        "finished_at_ms": now_ms(),
    }


async def test_replayed_request_and_result_spend_once(accountant: Pipeline) -> None:
    s = accountant.settings
    req = inference_request(user_id="replay-user", epsilon=2.0)
    rid = req["request_id"]
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"], times=2)
    decisions = await collect(
        s,
        topics.DECISIONS,
        until=lambda r: sum(d["request_id"] == rid for d in r) >= 2,
        timeout_s=30,
    )
    assert all(d["approved"] for d in decisions if d["request_id"] == rid)
    assert ledger_rows(accountant, rid) == [("reserved", 0.0)]

    result = node_result(req)
    await produce(s, topics.NODE_RESULTS, "InferenceResult", result, key=req["user_id"], times=2)
    finals = await collect(
        s, topics.RESULTS, until=lambda r: any(x["request_id"] == rid for x in r), timeout_s=30
    )
    mine = [x for x in finals if x["request_id"] == rid]
    assert mine[0]["status"] == "ok" and mine[0]["privacy_cost"] == pytest.approx(
        result["privacy_cost"]
    )
    await asyncio.sleep(1.0)
    rows = ledger_rows(accountant, rid)
    assert rows == [("committed", pytest.approx(result["privacy_cost"]))]
    budgets = await collect(s, topics.BUDGETS, until=lambda r: False, timeout_s=2)
    latest = [b for b in budgets if b["user_id"] == "replay-user"][-1]
    assert latest["user_spent_epsilon"] == pytest.approx(result["privacy_cost"])
    audit = await collect(s, topics.AUDIT, until=lambda r: False, timeout_s=2)
    committed = [a for a in audit if a["request_id"] == rid and a["action"] == "budget.committed"]
    assert len({a["event_id"] for a in committed}) == 1
    # What was reserved (ε 2.0) less what was spent comes back.
    refunded = float(committed[0]["details"]["refunded_epsilon"])
    assert refunded == pytest.approx(2.0 - result["privacy_cost"], abs=2e-6)


async def test_undecodable_goes_to_dlq_and_service_keeps_going(accountant: Pipeline) -> None:
    s = accountant.settings
    await produce_raw(s, topics.REQUESTS, b"\x00not avro", [("fedllm-fp", b"deadbeef")])
    req = inference_request(user_id="after-dlq", department="research", epsilon=5.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])

    def undecodable(m) -> bool:  # other tests dead-letter on this topic too
        return b"unknown schema fingerprint" in dict(m.headers)["dlq-error"]

    dead = await collect(
        s,
        topics.dlq(topics.REQUESTS),
        until=lambda r: any(map(undecodable, r)),
        raw=True,
        timeout_s=30,
    )
    assert any(map(undecodable, dead))
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
        timeout_s=30,
    )
    mine = [x for x in finals if x["request_id"] == req["request_id"]]
    assert mine[0]["status"] == "rejected"
    assert "budget exhausted" in mine[0]["reason"]


async def test_failed_node_result_refunds(accountant: Pipeline) -> None:
    s = accountant.settings
    req = inference_request(user_id="refund-user", epsilon=3.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    nothing_spent = dict(
        node_result(req, status="failed"), rdp_orders=[], rdp_epsilons=[], privacy_cost=0.0
    )  # a node's failure before any mechanism ran
    await produce(s, topics.NODE_RESULTS, "InferenceResult", nothing_spent, key=req["user_id"])
    await asyncio.sleep(1.5)
    assert ledger_rows(accountant, req["request_id"]) == [("reserved", 0.0)]
    router_verdict = dict(
        node_result(req, status="failed"),
        node_id="",
        reason="no node",
        rdp_orders=[],
        rdp_epsilons=[],
        privacy_cost=0.0,
    )  # nothing spent
    await produce(s, topics.NODE_RESULTS, "InferenceResult", router_verdict, key=req["user_id"])
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
        timeout_s=30,
    )
    mine = [x for x in finals if x["request_id"] == req["request_id"]]
    assert mine[0]["status"] == "failed" and mine[0]["remaining_budget"] == pytest.approx(10.0)
    assert ledger_rows(accountant, req["request_id"]) == [("refunded", 0.0)]


async def test_fan_out_parts_are_ignored_and_a_failed_verdict_charges_its_curve(
    accountant: Pipeline,
) -> None:
    s = accountant.settings
    req = inference_request(user_id="fanout-user", epsilon=2.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    part = PrivacyCurve.from_rho(0.002)
    await produce(
        s,
        topics.NODE_RESULTS,
        "InferenceResult",
        dict(node_result(req, curve=part), status="partial"),
        key=req["user_id"],
    )
    await asyncio.sleep(1.5)
    assert ledger_rows(accountant, req["request_id"]) == [("reserved", 0.0)]
    verdict = dict(
        node_result(req, status="failed", curve=part),
        node_id="",
        reason="h2 did not answer in time; partial release: h1 answered",
    )
    await produce(s, topics.NODE_RESULTS, "InferenceResult", verdict, key=req["user_id"])
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
        timeout_s=30,
    )
    mine = [x for x in finals if x["request_id"] == req["request_id"]]
    spent = part.epsilon(delta=1e-5)
    assert mine[0]["status"] == "failed" and mine[0]["response"] == ""
    assert mine[0]["privacy_cost"] == pytest.approx(spent)
    assert mine[0]["rdp_epsilons"] == pytest.approx(list(part.values))
    assert mine[0]["remaining_budget"] < 10.0
    assert ledger_rows(accountant, req["request_id"]) == [("committed", pytest.approx(spent))]


async def test_stale_reservation_times_out_and_refunds(accountant: Pipeline) -> None:
    s = accountant.settings
    req = inference_request(user_id="timeout-user", epsilon=1.0, deadline_s=1.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
        timeout_s=30,
    )
    mine = [x for x in finals if x["request_id"] == req["request_id"]]
    assert mine[0]["status"] == "timeout"
    assert ledger_rows(accountant, req["request_id"]) == [("refunded", 0.0)]


async def test_non_private_answer_is_withheld(accountant: Pipeline) -> None:
    s = accountant.settings
    req = inference_request(user_id="nonprivate-user", epsilon=1.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    result = dict(node_result(req), is_private=False)
    await produce(s, topics.NODE_RESULTS, "InferenceResult", result, key=req["user_id"])
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
        timeout_s=30,
    )
    mine = [x for x in finals if x["request_id"] == req["request_id"]]
    assert mine[0]["status"] == "failed" and mine[0]["response"] == ""
    assert "not released by a DP mechanism" in mine[0]["reason"]


async def test_admin_reset_is_applied_and_audited(accountant: Pipeline) -> None:
    import uuid

    s = accountant.settings
    req = inference_request(user_id="reset-user", department="radiology", epsilon=5.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    adj = {
        "adjustment_id": str(uuid.uuid4()),
        "action": "reset",
        "scope": "user",
        "subject": "reset-user",
        "reason": "clinical emergency",
        "actor_user_id": "root",
        "actor_role": "admin",
        "source_address": "10.0.0.1",
        "requested_at_ms": now_ms(),
    }
    await produce(s, topics.ADMIN, "BudgetAdjustment", adj, key="reset-user", times=2)
    audit = await collect(
        s, topics.AUDIT, until=lambda r: any(a["action"] == "budget.reset" for a in r), timeout_s=30
    )
    resets = {a["event_id"]: a for a in audit if a["action"] == "budget.reset"}
    assert len(resets) == 1
    (event,) = resets.values()
    assert event["user_id"] == "root" and event["outcome"] in ("applied", "replayed")
    budgets = await collect(
        s,
        topics.BUDGETS,
        until=lambda r: any(
            b["user_id"] == "reset-user" and b["user_spent_epsilon"] == 0.0 for b in r
        ),
        timeout_s=30,
    )
    assert any(b["user_id"] == "reset-user" and b["user_spent_epsilon"] == 0.0 for b in budgets)


async def test_a_spend_above_the_reservation_is_charged_and_alerted(accountant: Pipeline) -> None:
    s = accountant.settings
    req = inference_request(user_id="overspend-user", department="emergency", epsilon=0.5)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    too_much = PrivacyCurve.from_rho(0.5)  # ε(ρ=0.5) ≈ 5.3 ≫ the reserved 0.5
    await produce(
        s,
        topics.NODE_RESULTS,
        "InferenceResult",
        node_result(req, curve=too_much),
        key=req["user_id"],
    )
    audit = await collect(
        s,
        topics.AUDIT,
        until=lambda r: any(
            a["action"] == "budget.overspent" and a["request_id"] == req["request_id"] for a in r
        ),
        timeout_s=30,
    )
    alert = [
        a
        for a in audit
        if a["action"] == "budget.overspent" and a["request_id"] == req["request_id"]
    ][0]
    assert alert["outcome"] == "alert" and alert["hospital_id"] == "h1"
    assert "exceeds the reservation" in alert["reason"]
    spent = too_much.epsilon(delta=1e-5)
    assert ledger_rows(accountant, req["request_id"]) == [("committed", pytest.approx(spent))]


async def test_a_burst_is_decided_in_batches(accountant: Pipeline) -> None:
    s = accountant.settings
    reqs = [
        inference_request(user_id=f"burst-{i}", department="emergency", epsilon=0.01)
        for i in range(60)
    ]
    for req in reqs:
        await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    ids = {r["request_id"] for r in reqs}
    decisions = await collect(
        s, topics.DECISIONS, until=lambda r: ids <= {d["request_id"] for d in r}, timeout_s=60
    )
    mine = {d["request_id"]: d for d in decisions if d["request_id"] in ids}
    assert len(mine) == 60 and all(d["approved"] for d in mine.values())

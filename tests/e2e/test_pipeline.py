"""End to end through every service, on the real broker, Postgres and the real model."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, text

from fedllm.common import topics
from fedllm.common.db import normalise_url
from fedllm.launcher import Pipeline
from tests.e2e.conftest import HOSPITALS, ask_body, bearer
from tests.kafka_helpers import collect, inference_request, produce, produce_raw

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def sql(pipeline: Pipeline, query: str, **params) -> list[tuple]:
    engine = create_engine(normalise_url(pipeline.database_url))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params).all()]
    finally:
        engine.dispose()


def test_round_trip_answers_privately_and_charges_budget(
    pipeline: Pipeline, client: httpx.Client
) -> None:
    r = client.post(
        "/v1/inference",
        headers=bearer(pipeline, "e2e-alice", "cardiology"),
        json=ask_body(
            "What medications are given for chest pain?",
            epsilon=3.0,
            department="cardiology",
            max_tokens=12,
        ),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"].strip()
    assert body["node_id"] in {h.id for h in HOSPITALS}
    assert body["is_private"] is True
    assert 0 < body["privacy_cost"] <= 3.0 + 1e-9
    assert 0 < body["remaining_budget"] < 10.0
    assert body["processing_time"] > 0
    rows = sql(
        pipeline,
        "SELECT state, spent_epsilon FROM budget_entries WHERE request_id = :r",
        r=body["request_id"],
    )
    assert rows == [("committed", pytest.approx(body["privacy_cost"]))]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        b = client.get(
            "/v1/privacy/budget/e2e-alice", headers=bearer(pipeline, "e2e-alice", "cardiology")
        ).json()
        if b["remaining"] == pytest.approx(body["remaining_budget"]):
            break
        time.sleep(0.3)
    assert b["remaining"] == pytest.approx(body["remaining_budget"])


def test_budget_exhaustion_is_refused_with_reason(pipeline: Pipeline, client: httpx.Client) -> None:
    headers = bearer(pipeline, "e2e-raj", "research")
    body = ask_body(
        "Which conditions are most common?", epsilon=1.5, department="research", max_tokens=6
    )
    with ThreadPoolExecutor(max_workers=3) as pool:
        responses = list(
            pool.map(lambda _: client.post("/v1/inference", headers=headers, json=body), range(3))
        )
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and 403 in codes, [r.text for r in responses]
    refused = next(r.json() for r in responses if r.status_code == 403)
    assert "budget exhausted" in refused["detail"]
    assert 0 <= refused["remaining_budget"] < 1.5


def test_unauthenticated_is_401(client: httpx.Client) -> None:
    r = client.post("/v1/inference", json=ask_body("q", epsilon=1, department="general"))
    assert r.status_code == 401


def test_replayed_request_event_spends_once(pipeline: Pipeline) -> None:
    s = pipeline.settings
    req = inference_request(
        user_id="e2e-replay", department="cardiology", epsilon=2.0, max_tokens=4, deadline_s=120
    )
    rid = req["request_id"]
    asyncio.run(produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"], times=2))
    finals = asyncio.run(
        collect(
            s, topics.RESULTS, until=lambda r: any(x["request_id"] == rid for x in r), timeout_s=150
        )
    )
    final = next(x for x in finals if x["request_id"] == rid)
    assert final["status"] == "ok", final["reason"]
    time.sleep(2)
    assert sql(
        pipeline,
        "SELECT count(*), sum(spent_epsilon) FROM budget_entries WHERE user_id = 'e2e-replay'",
    ) == [(1, pytest.approx(final["privacy_cost"]))]


def test_undecodable_messages_go_to_dlq_and_pipeline_keeps_serving(
    pipeline: Pipeline, client: httpx.Client
) -> None:
    s = pipeline.settings
    poisoned = [
        topics.REQUESTS,
        topics.DECISIONS,
        topics.hospital_requests("st_mary"),
        topics.NODE_RESULTS,
        topics.AUDIT,
    ]
    for t in poisoned:
        asyncio.run(produce_raw(s, t, b"\xff\xfe garbage", [("fedllm-fp", b"nope")]))
    for t in poisoned:
        dead = asyncio.run(
            collect(s, topics.dlq(t), until=lambda r: len(r) >= 1, raw=True, timeout_s=60)
        )
        assert dead, f"nothing dead-lettered from {t}"
        headers = dict(dead[0].headers)
        assert headers["dlq-origin-topic"] == topics.scoped(s, t).encode()
        assert b"unknown schema fingerprint" in headers["dlq-error"]
    r = client.post(
        "/v1/inference",
        headers=bearer(pipeline, "e2e-after-dlq", "emergency"),
        json=ask_body("What is triage?", epsilon=2.0, department="emergency", max_tokens=4),
    )
    assert r.status_code == 200, r.text


def test_node_killed_mid_request_is_retried_or_refunded(
    pipeline: Pipeline, client: httpx.Client
) -> None:
    s = pipeline.settings
    headers = bearer(pipeline, "e2e-kill", "cardiology")
    body = ask_body(
        "What follow-up is advised after discharge?",
        epsilon=2.0,
        department="cardiology",
        max_tokens=24,
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(client.post, "/v1/inference", headers=headers, json=body)
        routed = asyncio.run(
            collect(
                s,
                topics.AUDIT,
                until=lambda r: any(
                    a["action"] == "request.routed" and a["user_id"] == "e2e-kill" for a in r
                ),
                timeout_s=60,
            )
        )
        first = next(
            a for a in routed if a["action"] == "request.routed" and a["user_id"] == "e2e-kill"
        )
        victim = first["hospital_id"]
        pipeline.kill(f"node-{victim}")
        r = fut.result(timeout=200)
    try:
        if r.status_code == 200:
            assert r.json()["node_id"] != victim
        else:
            assert r.status_code in (502, 504), r.text
            rid = r.json().get("request_id") or first["request_id"]  # a 502 body may not say
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline:
                rows = sql(
                    pipeline, "SELECT state FROM budget_entries WHERE request_id = :r", r=rid
                )
                if rows and rows[0][0] != "reserved":
                    break
                time.sleep(1)
            assert rows == [("refunded",)]
    finally:
        pipeline.start_service(f"node-{victim}", ["node", "--hospital", victim])
        pipeline.wait_ready([f"node-{victim}"], timeout_s=240)


def test_every_request_has_one_terminal_audit_record(
    pipeline: Pipeline, client: httpx.Client
) -> None:
    r = client.post(
        "/v1/inference",
        headers=bearer(pipeline, "e2e-audit", "general"),
        json=ask_body(
            "Summarise typical admissions.", epsilon=1.0, department="general", max_tokens=4
        ),
    )
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    terminal = ("request.completed", "request.rejected", "request.failed", "request.timeout")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = sql(
            pipeline, "SELECT action FROM audit_log WHERE request_id = :r ORDER BY seq", r=rid
        )
        if any(a in terminal for (a,) in rows):
            break
        time.sleep(0.5)
    actions = [a for (a,) in rows]
    assert sum(a in terminal for a in actions) == 1, actions
    for step in (
        "request.received",
        "budget.reserved",
        "request.routed",
        "budget.committed",
        "request.completed",
    ):
        assert step in actions, actions
    assert actions.index("budget.reserved") < actions.index("budget.committed")


def test_zz_every_request_of_the_session_ends_exactly_once(pipeline: Pipeline) -> None:
    """Runs last: every request the gateway received has exactly one terminal audit record."""
    terminal = ("request.completed", "request.rejected", "request.failed", "request.timeout")
    deadline = time.monotonic() + 180
    while True:
        received = {
            r
            for (r,) in sql(
                pipeline, "SELECT request_id FROM audit_log WHERE action = 'request.received'"
            )
        }
        ends = sql(
            pipeline,
            "SELECT request_id, count(*) FROM audit_log WHERE action IN "
            f"{terminal!r} GROUP BY request_id",
        )
        ended = dict(ends)
        if received <= set(ended) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(received) >= 5
    assert received <= set(ended), received - set(ended)
    assert all(n == 1 for n in ended.values()), ended

"""The answer cache on the real pipeline: real accountant and ledger (Postgres), router, node
workers with the real model, auditor, and the real Redis. A second gateway, with the cache on,
runs in process against the pipeline's broker."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from fedllm.launcher import Pipeline
from fedllm.services.gateway.settings import CacheSettings, GatewaySettings
from tests.e2e.conftest import ask_body, bearer
from tests.e2e.test_pipeline import sql
from tests.gateway.peers import running_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]

COUNT = {"op": "count", "where": {"age_min": 40}}


async def test_repeats_are_served_from_the_cache_and_charge_no_ledger(
    pipeline: Pipeline, redis_url: str
) -> None:
    user = f"e2e-cache-{uuid.uuid4().hex[:8]}"
    settings = pipeline.settings.model_copy(update={"redis_url": redis_url})
    gw = GatewaySettings(
        redis_prefix=f"fedllm:e2e:{uuid.uuid4().hex[:8]}", cache=CacheSettings(timeout_s=2.0)
    )  # a loaded machine is no outage
    headers = bearer(pipeline, user, "cardiology")
    aggregate = ask_body(
        json.dumps(COUNT),
        epsilon=1.0,
        department="cardiology",
        kind="aggregate",
        hospitals=["st_mary"],
    )
    text = ask_body("What is triage?", epsilon=2.0, department="cardiology", max_tokens=3)
    async with running_gateway(settings, gateway_settings=gw) as (_, client):
        client.timeout = 180
        answers = []
        for body in (aggregate, aggregate, text, text):
            r = await client.post("/v1/inference", json=body, headers=headers)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    fresh_agg, hit_agg, fresh_text, hit_text = answers
    for fresh, hit in ((fresh_agg, hit_agg), (fresh_text, hit_text)):
        assert fresh["cached"] is False and fresh["is_private"] is True
        assert hit["cached"] is True and hit["response"] == fresh["response"]
        assert hit["privacy_cost"] == 0.0
        assert hit["cached_release"]["release_id"] == fresh["request_id"]
        assert hit["cached_release"]["privacy_cost"] == pytest.approx(fresh["privacy_cost"])

    # The ledger holds the two fresh releases only, and exactly what they spent.
    spent = fresh_agg["privacy_cost"] + fresh_text["privacy_cost"]
    assert sql(
        pipeline,
        "SELECT count(*), sum(spent_epsilon) FROM budget_entries WHERE user_id = :u",
        u=user,
    ) == [(2, pytest.approx(spent))]
    # Each hit is in the audit trail as an answer: received, then completed with ε 0 and the
    # release it re-served; nothing reserved or charged.
    for hit in (hit_agg, hit_text):
        deadline = time.monotonic() + 30
        while True:
            rows = sql(
                pipeline,
                "SELECT action, epsilon, details FROM audit_log WHERE request_id = :r ORDER BY seq",
                r=hit["request_id"],
            )
            if len(rows) >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert [a for a, _, _ in rows] == ["request.received", "request.completed"], rows
        details = rows[1][2] if isinstance(rows[1][2], dict) else json.loads(rows[1][2])
        assert rows[1][1] == 0.0 and details["release_id"] == hit["cached_release"]["release_id"]

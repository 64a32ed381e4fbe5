"""POST /v1/inference against the real broker, with a test peer playing the accountant."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from fedllm.common import codec, topics
from fedllm.common.kafka import make_consumer
from tests.gateway.peers import FakeAccountant, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY = {
    "prompt": "Typical troponin trend after STEMI?",
    "max_tokens": 64,
    "temperature": 0.2,
    "privacy_budget": 0.5,
    "require_consensus": False,
    "priority": "normal",
}


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def test_round_trip_through_the_broker(settings):
    user = uid()
    async with FakeAccountant(settings, ok_result) as acct, running_gateway(settings) as (_, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(settings, user))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["response"] == "answer to generate"
        assert body["privacy_cost"] == 0.5
        assert body["remaining_budget"] == 9.5
        assert body["node_id"] == "st_mary"
        assert body["is_private"] is True and body["tokens"] == 7
        assert body["processing_time"] == pytest.approx(0.0125)
        [req] = [q for q in acct.seen if q["request_id"] == body["request_id"]]
        assert req["user_id"] == user and req["department"] == "cardiology"
        assert req["role"] == "doctor" and req["epsilon"] == 0.5
        assert req["delta"] == settings.budget.delta
        assert req["source_address"] == "10.0.0.1"
        assert req["deadline_ms"] - req["created_at_ms"] == int(settings.request_timeout_s * 1000)
        assert req["prompt"] == BODY["prompt"] and req["kind"] == "generate"


async def test_request_is_keyed_by_user_and_audited_without_prompt(settings):
    user = uid()
    audit = make_consumer(settings, topics.AUDIT, group_id=None, auto_offset_reset="latest")
    await audit.start()
    try:
        async with FakeAccountant(settings, ok_result), running_gateway(settings) as (_, c):
            await audit.seek_to_end()
            r = await c.post("/v1/inference", json=BODY, headers=token(settings, user))
            assert r.status_code == 200
            rid = r.json()["request_id"]
            found = None
            for _ in range(50):
                for recs in (await audit.getmany(timeout_ms=100)).values():
                    for m in recs:
                        ev = codec.decode_expect("AuditEvent", m.value, m.headers)
                        if ev["request_id"] == rid and ev["action"] == "request.received":
                            found = ev
                if found:
                    break
        assert found is not None
        assert found["user_id"] == user and found["epsilon"] == 0.5
        assert len(found["prompt_hmac"]) == 64
        assert BODY["prompt"] not in json.dumps(found)
    finally:
        await audit.stop()


async def test_budget_refused_is_403_with_reason_and_remaining(settings):
    def refuse(req):
        return ok_result(
            req,
            status="rejected",
            reason="user budget exhausted",
            response="",
            remaining_budget=0.25,
            privacy_cost=0.0,
        )

    async with FakeAccountant(settings, refuse), running_gateway(settings) as (_, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(settings, uid()))
    assert r.status_code == 403
    assert r.json() == {"detail": "user budget exhausted", "remaining_budget": 0.25}


@pytest.mark.parametrize(("status", "code"), [("failed", 502), ("timeout", 504)])
async def test_failed_and_timeout_results(settings, status, code):
    def answer(req):
        return ok_result(req, status=status, reason=f"node {status}", response="")

    async with FakeAccountant(settings, answer), running_gateway(settings) as (_, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(settings, uid()))
    assert r.status_code == code
    assert r.json()["detail"] == f"node {status}"


async def test_no_result_before_deadline_is_504_with_request_id(settings):
    async with running_gateway(settings, request_timeout_s=0.5) as (app, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(settings, uid()))
        assert r.status_code == 504
        assert uuid.UUID(r.json()["request_id"])
        assert app.state.gateway.correlator.pending == 0


async def test_concurrent_requests_are_correlated(settings):
    def echo(req):
        return ok_result(req, response=f"for {req['prompt']}")

    async with FakeAccountant(settings, echo), running_gateway(settings) as (_, c):
        hdrs = token(settings, uid())
        rs = await asyncio.gather(
            *[
                c.post("/v1/inference", json={**BODY, "prompt": f"q{i}"}, headers=hdrs)
                for i in range(10)
            ]
        )
    assert [r.json()["response"] for r in rs] == [f"for q{i}" for i in range(10)]


async def test_duplicate_and_unknown_results_are_ignored(settings):
    def twice(req):
        return [ok_result(req), ok_result(req, response="duplicate")]

    async with FakeAccountant(settings, twice) as acct, running_gateway(settings) as (_, c):
        # A result for nobody, and a duplicate of a settled one: neither disturbs the gateway.
        await acct.bus.send(
            topics.RESULTS,
            "InferenceResult",
            ok_result(
                {
                    "request_id": "nobody",
                    "user_id": "x",
                    "department": "general",
                    "kind": "generate",
                    "epsilon": 1.0,
                    "delta": 1e-5,
                }
            ),
        )
        r1 = await c.post("/v1/inference", json=BODY, headers=token(settings, uid()))
        r2 = await c.post("/v1/inference", json=BODY, headers=token(settings, uid()))
    assert r1.status_code == r2.status_code == 200
    assert r1.json()["request_id"] != r2.json()["request_id"]
    assert r1.json()["response"] == r2.json()["response"] == "answer to generate"


async def test_aggregate_kind_and_hospitals_reach_the_request(settings):
    query = json.dumps({"op": "count", "where": {"diagnosis": "I21"}})
    async with FakeAccountant(settings, ok_result) as acct, running_gateway(settings) as (_, c):
        r = await c.post(
            "/v1/inference",
            headers=token(settings, uid()),
            json={
                **BODY,
                "prompt": query,
                "kind": "aggregate",
                "hospitals": ["st_mary", "northside"],
            },
        )
        assert r.status_code == 200, r.text
        [req] = [q for q in acct.seen if q["request_id"] == r.json()["request_id"]]
    assert req["kind"] == "aggregate" and req["hospitals"] == ["st_mary", "northside"]


async def test_use_adapter_reaches_the_request_and_the_response_names_the_adapter(settings):
    """use_adapter (docs/federated.md): forwarded on the request; the answer's adapter hash and
    training ε come back; refused (422) for aggregate queries, before anything is reserved."""
    user = uid()

    def adapter_result(request):
        if not request["use_adapter"]:
            return ok_result(request)
        return ok_result(request, privacy_cost=0.0, adapter_hash="ab" * 32, adapter_epsilon=8.25)

    async with (
        FakeAccountant(settings, adapter_result) as acct,
        running_gateway(settings) as (
            _,
            c,
        ),
    ):
        r = await c.post(
            "/v1/inference", json={**BODY, "use_adapter": True}, headers=token(settings, user)
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["privacy_cost"] == 0.0
        assert body["adapter_hash"] == "ab" * 32 and body["adapter_epsilon"] == 8.25
        r = await c.post(
            "/v1/inference",
            json={**BODY, "use_adapter": True, "kind": "aggregate", "prompt": '{"op": "count"}'},
            headers=token(settings, user),
        )
        assert r.status_code == 422 and "use_adapter" in r.text
        r = await c.post("/v1/inference", json=BODY, headers=token(settings, user))
        assert r.status_code == 200 and r.json()["adapter_hash"] == ""
        assert [q["use_adapter"] for q in acct.seen if q["user_id"] == user] == [True, False]

"""require_consensus at the gateway: refused up front when it cannot be had; the response
carries consensus_reached and confidence_score (defaults keep existing clients working)."""

from __future__ import annotations

import json

import pytest

from tests.gateway.peers import FakeAccountant, make_settings, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

AGG = {
    "prompt": json.dumps({"op": "count"}),
    "kind": "aggregate",
    "privacy_budget": 1.0,
    "require_consensus": True,
}


async def test_consensus_for_text_or_with_too_few_hospitals_is_422(settings):
    three = make_settings(settings.kafka_bootstrap, consensus_k=3)  # cardiology: 2 hospitals
    async with running_gateway(three) as (_, c):
        r = await c.post("/v1/inference", json=AGG, headers=token(three, "u1"))
        assert r.status_code == 422 and "consensus needs 3 hospitals" in r.json()["detail"]
        text = {**AGG, "kind": "generate", "prompt": "hello"}
        r = await c.post("/v1/inference", json=text, headers=token(three, "u1"))
        assert r.status_code == 422 and "aggregate queries only" in r.json()["detail"]


async def test_consensus_fields_and_the_409_when_the_router_finds_too_few(settings):
    def behaviour(req):
        if req["prompt"] == json.dumps({"op": "count", "where": {"sex": "F"}}):
            return ok_result(
                req, status="failed", reason="consensus unavailable: needs 2, 1 eligible"
            )
        if not req["require_consensus"]:
            return ok_result(req)
        return ok_result(req, consensus_reached=True, confidence_score=0.8)

    async with FakeAccountant(settings, behaviour), running_gateway(settings) as (_, c):
        r = await c.post("/v1/inference", json=AGG, headers=token(settings, "u-cons"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["consensus_reached"] is True and body["confidence_score"] == 0.8
        assert body["success"] is True
        few = {**AGG, "prompt": json.dumps({"op": "count", "where": {"sex": "F"}})}
        r = await c.post("/v1/inference", json=few, headers=token(settings, "u-cons"))
        assert r.status_code == 409 and "consensus unavailable" in r.json()["detail"]
        plain = {**AGG, "require_consensus": False}
        r = await c.post("/v1/inference", json=plain, headers=token(settings, "u-cons"))
        assert r.json()["consensus_reached"] is False and r.json()["confidence_score"] is None


async def test_openapi_documents_the_new_fields_with_defaults(settings):
    async with running_gateway(settings) as (_, c):
        spec = (await c.get("/openapi.json")).json()
    props = spec["components"]["schemas"]["InferenceResponse"]["properties"]
    assert props["consensus_reached"]["default"] is False and props["success"]["default"] is True
    assert "confidence_score" in props
    required = spec["components"]["schemas"]["InferenceResponse"]["required"]
    assert not {"consensus_reached", "confidence_score", "success"} & set(required)
    assert "409" in spec["paths"]["/v1/inference"]["post"]["responses"]

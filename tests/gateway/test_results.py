"""Idempotency-Key and GET /v1/inference/{request_id}, against the real broker (and Redis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fedllm.common import topics
from fedllm.common.kafka import Bus, make_producer
from fedllm.services.gateway.settings import CacheSettings, GatewaySettings
from tests.gateway.peers import FakeAccountant, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY = {
    "prompt": "Typical troponin trend after STEMI?",
    "max_tokens": 8,
    "temperature": 0.2,
    "privacy_budget": 0.5,
}


def no_cache() -> GatewaySettings:
    """These tests count fresh requests: the answer cache (on with Redis) would answer repeats."""
    return GatewaySettings(cache=CacheSettings(enabled=False))


def uid() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", "redis"])
def store_settings(request, settings, redis_url):  # type: ignore[no-untyped-def]
    """The gateway's settings with the in-process store, or with the shared Redis store."""
    if request.param == "memory":
        return settings
    return settings.model_copy(update={"redis_url": redis_url})


async def test_same_idempotency_key_and_caller_is_the_same_request_charged_once(
    store_settings,
) -> None:
    user, key = uid(), f"key-{uuid.uuid4().hex}"
    async with (
        FakeAccountant(store_settings, ok_result) as acct,
        running_gateway(store_settings, gateway_settings=no_cache()) as (_, c),
    ):
        first = await c.post(
            "/v1/inference",
            json=BODY,
            headers={**token(store_settings, user), "Idempotency-Key": key},
        )
        again = await c.post(
            "/v1/inference",
            json=BODY,
            headers={**token(store_settings, user), "Idempotency-Key": key},
        )
        other = await c.post(
            "/v1/inference",
            json=BODY,
            headers={**token(store_settings, uid()), "Idempotency-Key": key},
        )
        await asyncio.sleep(0.5)
        seen = [q["request_id"] for q in acct.seen]
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json() == first.json()
    assert other.json()["request_id"] != first.json()["request_id"]
    assert seen.count(first.json()["request_id"]) == 1  # produced (and charged) once
    assert other.json()["request_id"] in seen


async def test_a_result_after_the_504_is_collected_by_its_owner_only(store_settings) -> None:
    user = uid()
    async with running_gateway(
        store_settings, gateway_settings=no_cache(), request_timeout_s=0.5
    ) as (_, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(store_settings, user))
        assert r.status_code == 504
        rid = r.json()["request_id"]
        assert rid in r.json()["detail"]
        pending = await c.get(f"/v1/inference/{rid}", headers=token(store_settings, user))
        assert pending.status_code == 202 and pending.json() == {
            "request_id": rid,
            "status": "pending",
        }
        producer = make_producer(store_settings)
        await producer.start()
        try:
            late = ok_result(
                {
                    "request_id": rid,
                    "user_id": user,
                    "department": "cardiology",
                    "kind": "generate",
                    "epsilon": 0.5,
                    "delta": 1e-5,
                },
                response="the late answer",
            )
            bus = Bus(producer, store_settings.topic_namespace)
            await bus.send(topics.RESULTS, "InferenceResult", late, key=rid)
        finally:
            await producer.stop()
        for _ in range(300):
            got = await c.get(f"/v1/inference/{rid}", headers=token(store_settings, user))
            if got.status_code != 202:
                break
            await asyncio.sleep(0.1)
        assert got.status_code == 200, got.text
        assert got.json()["response"] == "the late answer" and got.json()["request_id"] == rid
        stranger = await c.get(f"/v1/inference/{rid}", headers=token(store_settings, uid()))
        assert stranger.status_code == 404
        unknown = await c.get(f"/v1/inference/{uuid.uuid4()}", headers=token(store_settings, user))
        assert unknown.status_code == 404

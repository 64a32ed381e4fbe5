"""Sliding-window rate limits: per user and per address, shared through Redis, 429 + Retry-After."""

from __future__ import annotations

import uuid

import pytest

from fedllm.services.gateway.ratelimit import MemoryRateLimiter, RedisRateLimiter, Window
from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import AuditTap, FakeAccountant, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY = {"prompt": "q", "privacy_budget": 0.1, "max_tokens": 8}


def prefix() -> str:
    return f"fedllm:test:{uuid.uuid4().hex[:8]}"


async def test_two_gateways_share_one_redis_window(settings, redis_url):
    s = settings.model_copy(update={"redis_url": redis_url})
    gw = GatewaySettings(rate_limit_user=3, rate_limit_address=100, redis_prefix=prefix())
    hdrs = token(s, f"rl-{uuid.uuid4().hex[:6]}")
    async with (
        FakeAccountant(s, ok_result),
        running_gateway(s, gateway_settings=gw) as (_, a),
        running_gateway(s, gateway_settings=gw) as (_, b),
    ):
        codes = [
            (await cl.post("/v1/inference", json=BODY, headers=hdrs)).status_code
            for cl in (a, b, a)
        ]
        assert codes == [200, 200, 200]
        async with AuditTap(s) as tap:
            r = await b.post("/v1/inference", json=BODY, headers=hdrs)
            assert r.status_code == 429
            assert r.json()["detail"] == "user rate limit exceeded"
            assert 1 <= int(r.headers["retry-after"]) <= gw.rate_window_s
            assert await tap.wait_for(lambda e: e["action"] == "rate.limited") is not None
        # Another user is unaffected.
        assert (
            await a.post("/v1/inference", json=BODY, headers=token(s, "someone-else"))
        ).status_code == 200


async def test_address_limit_across_users(settings, redis_url):
    s = settings.model_copy(update={"redis_url": redis_url})
    gw = GatewaySettings(rate_limit_user=100, rate_limit_address=2, redis_prefix=prefix())
    async with (
        FakeAccountant(s, ok_result),
        running_gateway(s, gateway_settings=gw, client_address="192.0.2.7") as (_, c),
    ):
        codes = [
            (await c.post("/v1/inference", json=BODY, headers=token(s, f"user{i}"))).status_code
            for i in range(3)
        ]
    assert codes == [200, 200, 429]


async def test_in_process_limiter_without_redis(settings):
    assert settings.redis_url == ""
    gw = GatewaySettings(rate_limit_user=2, rate_limit_address=100)
    hdrs = token(settings, f"mem-{uuid.uuid4().hex[:6]}")
    async with (
        FakeAccountant(settings, ok_result),
        running_gateway(settings, gateway_settings=gw) as (app, c),
    ):
        assert isinstance(app.state.gateway.limiter, MemoryRateLimiter)
        codes = [
            (await c.post("/v1/inference", json=BODY, headers=hdrs)).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]


async def test_limiter_store_down_fails_closed(settings):
    s = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_gateway(s, request_timeout_s=0.2) as (_, c):
        r = await c.post("/v1/inference", json=BODY, headers=token(s, "u"))
        assert r.status_code == 503
        ready = await c.get("/v1/ready")
        assert ready.status_code == 503 and ready.json()["limiter"] is False


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_window_slides(backend, redis_url):
    """Both backends: limit reached -> refused with a retry hint; an old event falls out."""
    if backend == "memory":
        now = [1000.0]
        limiter = MemoryRateLimiter(clock=lambda: now[0])
    else:
        limiter = RedisRateLimiter(redis_url)
    key = f"{prefix()}:k"
    try:
        w = Window(key, limit=2, window_s=1 if backend == "redis" else 60)
        assert (await limiter.hit([w])).allowed
        assert (await limiter.hit([w])).allowed
        v = await limiter.hit([w])
        assert not v.allowed and v.retry_after_s >= 1 and v.blocked_key == key
        if backend == "memory":
            now[0] += 61
        else:
            import asyncio

            await asyncio.sleep(1.1)
        assert (await limiter.hit([w])).allowed
        # all-or-nothing: a blocked second window does not consume the first
        full = Window(f"{key}:full", limit=1, window_s=60)
        assert (await limiter.hit([full])).allowed
        free = Window(f"{key}:free", limit=1, window_s=60)
        assert not (await limiter.hit([free, full])).allowed
        assert (await limiter.hit([free])).allowed
    finally:
        await limiter.close()

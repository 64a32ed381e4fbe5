"""/v1/health, /v1/ready, /metrics, startup refusal, and the uvicorn service."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fedllm.common.lifecycle import ready_path
from fedllm.embedded import free_port
from fedllm.services.gateway.app import create_app
from fedllm.services.gateway.service import run
from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import FakeAccountant, make_settings, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_health_and_ready(settings):
    async with running_gateway(settings) as (app, c):
        health = (await c.get("/v1/health")).json()
        assert health["status"] == "alive"
        assert health["emergency"]["lockdown"] is False and health["emergency"]["halted"] is False
        r = await c.get("/v1/ready")
        assert r.status_code == 200, r.text
        assert r.json()["ready"] is True
        # Stop one consumer: readiness must drop.
        await app.state.gateway.budgets.stop()
        r = await c.get("/v1/ready")
        assert r.status_code == 503 and r.json()["budgets_assigned"] is False


async def test_not_ready_before_lifespan(settings):
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/v1/ready")
    assert r.status_code == 503 and r.json()["ready"] is False


async def test_metrics_count_requests_by_status(settings):
    async with FakeAccountant(settings, ok_result), running_gateway(settings) as (_, c):
        body = {"prompt": "p", "max_tokens": 8, "temperature": 0.1, "privacy_budget": 0.1}
        assert (
            await c.post("/v1/inference", json=body, headers=token(settings, "m1"))
        ).status_code == 200
        assert (await c.post("/v1/inference", json=body)).status_code == 401
        text = (await c.get("/metrics")).text
    assert 'fedllm_gateway_http_requests_total{route="/v1/inference",status="200"} 1.0' in text
    assert 'fedllm_gateway_http_requests_total{route="/v1/inference",status="401"} 1.0' in text
    assert 'fedllm_gateway_inference_total{outcome="ok"} 1.0' in text
    assert "fedllm_gateway_http_request_duration_seconds_bucket" in text


async def test_placeholder_secret_refused_outside_demo(kafka_bootstrap):
    for secret in ("", "changeme", "secret"):
        with pytest.raises(ValueError, match="JWT_SECRET"):
            create_app(make_settings(kafka_bootstrap, jwt_secret=secret))
    create_app(make_settings(kafka_bootstrap, jwt_secret="", mode="demo"))


async def test_service_serves_http_and_marks_ready(settings, tmp_path):
    port = free_port()
    s = settings.model_copy(update={"gateway_port": port, "data_dir": tmp_path})
    stop = asyncio.Event()
    task = asyncio.create_task(run(s, stop=stop, gateway_settings=GatewaySettings()))
    try:
        for _ in range(200):
            if ready_path(s, "gateway").exists():
                break
            await asyncio.sleep(0.05)
        assert ready_path(s, "gateway").exists()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            assert (await c.get("/v1/health")).status_code == 200
            assert (await c.get("/openapi.json")).json()["info"]["title"] == "fedllm gateway"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert not ready_path(s, "gateway").exists()

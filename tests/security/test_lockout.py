"""Brute force on /v1/auth/token: lock the account (423) and the address (429), audited."""

from __future__ import annotations

import pytest

from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import AuditTap, running_gateway
from tests.security.conftest import PASSWORDS

pytestmark = pytest.mark.asyncio(loop_scope="session")

GOOD = {"username": "dr_grey", "password": PASSWORDS["dr_grey"][2]}
BAD = {"username": "dr_grey", "password": "guess"}


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_user_lockout_blocks_even_the_right_password(settings, users, gw, redis_url, backend):
    s = settings.model_copy(update={"redis_url": redis_url if backend == "redis" else ""})
    gw = gw.model_copy(update={"lockout_user_failures": 3, "lockout_address_failures": 100})
    async with running_gateway(s, gateway_settings=gw) as (_, c), AuditTap(s) as tap:
        for _ in range(3):
            assert (await c.post("/v1/auth/token", json=BAD)).status_code == 401
        r = await c.post("/v1/auth/token", json=GOOD)
        assert r.status_code == 423
        assert 1 <= int(r.headers["retry-after"]) <= gw.lockout_window_s
        ev = await tap.wait_for(
            lambda e: e["action"] == "auth.lockout" and e["details"].get("scope") == "user"
        )
        assert ev is not None and ev["user_id"] == "dr_grey"
        assert ev["details"]["severity"] == "security"
        assert await tap.wait_for(lambda e: e["action"] == "auth.locked") is not None
        # Other accounts still work from this address.
        other = {"username": "nurse_joy", "password": PASSWORDS["nurse_joy"][2]}
        assert (await c.post("/v1/auth/token", json=other)).status_code == 200


async def test_success_resets_the_user_counter(settings, gw):
    gw = gw.model_copy(update={"lockout_user_failures": 3})
    async with running_gateway(settings, gateway_settings=gw) as (_, c):
        for _ in range(2):
            assert (await c.post("/v1/auth/token", json=BAD)).status_code == 401
        assert (await c.post("/v1/auth/token", json=GOOD)).status_code == 200
        for _ in range(2):
            assert (await c.post("/v1/auth/token", json=BAD)).status_code == 401
        assert (await c.post("/v1/auth/token", json=GOOD)).status_code == 200


async def test_address_lockout_across_usernames(settings, gw, redis_url):
    s = settings.model_copy(update={"redis_url": redis_url})
    gw = gw.model_copy(update={"lockout_user_failures": 100, "lockout_address_failures": 4})
    async with (
        running_gateway(s, gateway_settings=gw, client_address="198.51.100.9") as (_, c),
        AuditTap(s) as tap,
    ):
        for i in range(4):
            r = await c.post("/v1/auth/token", json={"username": f"spray{i}", "password": "x"})
            assert r.status_code == 401
        r = await c.post("/v1/auth/token", json=GOOD)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        ev = await tap.wait_for(
            lambda e: e["action"] == "auth.lockout" and e["details"].get("scope") == "address"
        )
        assert ev is not None and ev["source_address"] == "198.51.100.9"
    # A second gateway on the same Redis sees the same lock.
    async with running_gateway(s, gateway_settings=gw, client_address="198.51.100.9") as (_, c2):
        assert (await c2.post("/v1/auth/token", json=GOOD)).status_code == 429


async def test_lockout_store_down_fails_closed(settings, users):
    s = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with running_gateway(s, gateway_settings=GatewaySettings(users=users)) as (_, c):
        assert (await c.post("/v1/auth/token", json=GOOD)).status_code == 503

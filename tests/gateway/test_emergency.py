"""Emergency controls on the real broker: admin only, audited, published on fedllm.control,
visible in /v1/health; lockdown serves only admins, halt refuses new inference."""

from __future__ import annotations

import uuid

import pytest

from fedllm.common import topics
from tests.gateway.peers import AuditTap, running_gateway, token
from tests.gateway.test_admin import Tap, admin

pytestmark = pytest.mark.asyncio(loop_scope="session")

QUERY = {"prompt": "How is chest pain triaged?", "privacy_budget": 0.5}


def doctor(settings) -> dict[str, str]:
    return token(settings, f"dr-{uuid.uuid4().hex[:8]}")


async def test_only_admins_use_the_emergency_controls(settings) -> None:
    async with running_gateway(settings) as (_, client):
        for path, body in [
            ("/v1/admin/emergency/lockdown", {"enabled": True, "reason": "test"}),
            ("/v1/admin/emergency/halt", {"enabled": True, "reason": "test"}),
            ("/v1/admin/nodes/st_mary/breaker", {"open": True, "reason": "test"}),
        ]:
            r = await client.post(path, json=body, headers=doctor(settings))
            assert r.status_code == 403, (path, r.text)
        r = await client.post(
            "/v1/admin/emergency/lockdown", json={"enabled": True}, headers=admin(settings)
        )
        assert r.status_code == 422  # a reason is required
        health = (await client.get("/v1/health")).json()
        assert health["emergency"]["lockdown"] is False


async def test_lockdown_serves_only_admins_and_is_audited(settings) -> None:
    adm = admin(settings)
    async with (
        running_gateway(settings) as (_, client),
        AuditTap(settings) as audit,
        Tap(settings, topics.CONTROL, "ControlCommand") as control,
    ):
        try:
            r = await client.post(
                "/v1/admin/emergency/lockdown",
                json={"enabled": True, "reason": "suspected credential leak"},
                headers=adm,
            )
            assert r.status_code == 200 and r.json()["lockdown"] is True
            r = await client.get("/v1/privacy/budget/dr-x", headers=token(settings, "dr-x"))
            assert r.status_code == 503
            assert r.json()["detail"] == "security lockdown: suspected credential leak"
            r = await client.post("/v1/inference", json=QUERY, headers=doctor(settings))
            assert r.status_code == 503
            assert (await client.get("/v1/admin/config", headers=adm)).status_code == 200
            r = await client.get("/v1/privacy/budget/dr-x")  # no token: 401 as always
            assert r.status_code == 401
            health = (await client.get("/v1/health")).json()
            assert health["emergency"]["lockdown_reason"] == "suspected credential leak"
            event = await audit.wait_for(lambda e: e["action"] == "admin.control.lockdown")
            assert event is not None and event["outcome"] == "accepted"
            published = await control.wait_for(lambda c: c["action"] == "lockdown")
            assert published is not None
            assert published[1]["reason"] == "suspected credential leak"
        finally:
            r = await client.post(
                "/v1/admin/emergency/lockdown",
                json={"enabled": False, "reason": "all clear"},
                headers=adm,
            )
        assert r.status_code == 200 and r.json()["lockdown"] is False
        r = await client.get("/v1/privacy/budget/dr-x", headers=token(settings, "dr-x"))
        assert r.status_code != 503


async def test_a_new_gateway_folds_the_control_log(settings) -> None:
    """State comes from the topic: a gateway started later sees the halt in force."""
    adm = admin(settings)
    async with running_gateway(settings) as (_, first):
        try:
            r = await first.post(
                "/v1/admin/emergency/halt", json={"enabled": True, "reason": "drill"}, headers=adm
            )
            assert r.status_code == 200 and r.json()["halted"] is True
            async with running_gateway(settings) as (_, second):
                r = await second.post("/v1/inference", json=QUERY, headers=doctor(settings))
                assert r.status_code == 503
                assert r.json()["detail"] == "processing halted: drill"
                assert (await second.get("/v1/health")).json()["emergency"]["halted"] is True
        finally:
            r = await first.post(
                "/v1/admin/emergency/halt", json={"enabled": False, "reason": "over"}, headers=adm
            )
        assert r.json()["halted"] is False


async def test_manual_breaker_is_published_and_shown(settings) -> None:
    adm = admin(settings)
    node = f"hx_{uuid.uuid4().hex[:6]}"
    async with (
        running_gateway(settings) as (_, client),
        Tap(settings, topics.CONTROL, "ControlCommand") as control,
    ):
        r = await client.post(
            f"/v1/admin/nodes/{node}/breaker",
            json={"open": True, "reason": "wrong answers"},
            headers=adm,
        )
        assert r.status_code == 200 and r.json()["open_breakers"][node] == "wrong answers"
        assert (await client.get("/v1/health")).json()["emergency"]["open_breakers"][node]
        view = (await client.get("/v1/admin/emergency", headers=adm)).json()
        assert view["open_breakers"][node] == "wrong answers" and view["halted"] is False
        assert await control.wait_for(
            lambda c: c["action"] == "breaker_open" and c["target"] == node
        )
        r = await client.post(
            f"/v1/admin/nodes/{node}/breaker", json={"open": False, "reason": "fixed"}, headers=adm
        )
        assert node not in r.json()["open_breakers"]
        r = await client.post(
            "/v1/admin/nodes/bad id!/breaker", json={"open": True, "reason": "x!!"}, headers=adm
        )
        assert r.status_code in (404, 422)

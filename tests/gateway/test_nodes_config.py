"""Node admission and run-time configuration on the real broker: admin only, validated,
published on fedllm.control, audited with old and new values, applied where used."""

from __future__ import annotations

import json
import uuid

import pytest

from fedllm.common import control, topics
from fedllm.services.gateway import control_plane
from fedllm.services.router.service import RouterService
from tests.gateway.peers import AuditTap, running_gateway, token
from tests.gateway.test_admin import Tap, admin

pytestmark = pytest.mark.asyncio(loop_scope="session")


class FakeCache:
    """Stands in for the Redis answer cache (only closed by the app)."""

    async def close(self) -> None:
        return None


def node_body(action: str, hospital_id: str, **kw) -> dict:
    return {"action": action, "hospital_id": hospital_id, "reason": "onboarding test", **kw}


async def test_node_lifecycle_register_approve_drain_remove(settings) -> None:
    adm = admin(settings)
    node = f"nh_{uuid.uuid4().hex[:6]}"
    async with (
        running_gateway(settings) as (_, client),
        AuditTap(settings) as audit,
        Tap(settings, topics.CONTROL, "ControlCommand") as tap,
    ):
        r = await client.post(
            "/v1/admin/nodes", json=node_body("register", node), headers=token(settings, "dr_x")
        )
        assert r.status_code == 403
        r = await client.post("/v1/admin/nodes", json=node_body("approve", node), headers=adm)
        assert r.status_code == 409 and "unknown" in r.json()["detail"]
        r = await client.post(
            "/v1/admin/nodes",
            json=node_body("register", node, departments=["cardiology"]),
            headers=adm,
        )
        assert r.status_code == 200, r.text
        assert r.json() == {
            "hospital_id": node,
            "status": "registered",
            "configured": False,
            "departments": ["cardiology"],
        }
        for action, status in [
            ("approve", "approved"),
            ("drain", "draining"),
            ("remove", "removed"),
        ]:
            r = await client.post("/v1/admin/nodes", json=node_body(action, node), headers=adm)
            assert r.status_code == 200 and r.json()["status"] == status, r.text
        r = await client.post("/v1/admin/nodes", json=node_body("drain", node), headers=adm)
        assert r.status_code == 409
        listed = (await client.get("/v1/admin/nodes/admission", headers=adm)).json()
        statuses = {n["hospital_id"]: n["status"] for n in listed}
        assert statuses[node] == "removed" and statuses["st_mary"] == "approved"
        ev = await audit.wait_for(
            lambda e: (
                e["action"] == "admin.control.node_approve" and e["details"].get("target") == node
            )
        )
        assert ev is not None and ev["details"]["previous_status"] == "registered"
        assert await tap.wait_for(lambda c: c["action"] == "node_remove" and c["target"] == node)
        for bad in [
            node_body("register", "no spaces!"),
            node_body("register", node, departments=["Bad Dept"]),
            {"action": "promote", "hospital_id": node, "reason": "xyz"},
        ]:
            r = await client.post("/v1/admin/nodes", json=bad, headers=adm)
            assert r.status_code == 422, (bad, r.text)


async def test_config_change_is_validated_audited_and_applied(settings) -> None:
    adm = admin(settings)
    async with running_gateway(settings) as (app, client), AuditTap(settings) as audit:
        state = app.state.gateway
        sentinel = FakeCache()
        state.cache = sentinel  # stands in for the Redis answer cache
        try:
            for bad in [
                {"settings": {"router_strategy": "fastest"}, "reason": "try"},
                {"settings": {"jwt_secret": "x"}, "reason": "try"},
                {"settings": {"cache_enabled": "no"}, "reason": "try"},
                {"settings": {"breaker_error_rate": 0}, "reason": "try"},
                {"settings": {"cache_enabled": 0}, "reason": "try"},
            ]:
                r = await client.put("/v1/admin/config", json=bad, headers=adm)
                assert r.status_code == 422, (bad, r.text)
            r = await client.put(
                "/v1/admin/config",
                json={"settings": {"cache_enabled": False}, "reason": "cache incident"},
                headers=adm,
            )
            assert r.status_code == 200, r.text
            assert r.json()["changed"] == {"cache_enabled": False}
            assert r.json()["runtime"]["cache_enabled"]["value"] is False
            assert state.cache is None  # applied in the gateway
            ev = await audit.wait_for(
                lambda e: (
                    e["action"] == "admin.control.config_set"
                    and e["details"].get("target") == "cache_enabled"
                )
            )
            assert ev is not None
            assert (ev["details"]["old_value"], ev["details"]["new_value"]) == ("true", "false")
            runtime = (await client.get("/v1/admin/config/runtime", headers=adm)).json()
            assert runtime["cache_enabled"]["value"] is False
        finally:
            r = await client.put(
                "/v1/admin/config",
                json={"settings": {"cache_enabled": True}, "reason": "restored"},
                headers=adm,
            )
        assert r.status_code == 200 and state.cache is sentinel


async def test_router_applies_a_new_strategy_from_the_control_log(settings) -> None:
    router = RouterService(settings)
    assert router.dispatcher.strategy.name != "round_robin"
    router.control.apply(
        {
            "command_id": uuid.uuid4().hex,
            "action": "config_set",
            "target": "router_strategy",
            "value": json.dumps("round_robin"),
            "reason": "test",
            "actor_user_id": "adm",
            "actor_role": "admin",
            "issued_at_ms": 0,
        }
    )
    assert router.dispatcher.strategy.name == "round_robin"
    await router.stop()  # closes the (never started) clients
    assert control.RUNTIME_CONFIG["router_strategy"].used_by == ("router",)
    assert control_plane.EXTRA_KEY == "control"

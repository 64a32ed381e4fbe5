"""Role-based access: the default matrix, 403 with a reason, and an access.denied audit event."""

from __future__ import annotations

import json
import uuid

import pytest

from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import AuditTap, FakeAccountant, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEXT = {"prompt": "Summarise recent admissions", "privacy_budget": 0.5}
AGG = {
    "prompt": json.dumps({"op": "count", "where": {"diagnosis": "E11", "sex": "F"}}),
    "privacy_budget": 0.5,
    "kind": "aggregate",
}
# Valid in the query grammar (a medication name is free text) yet it names an identifying field.
AGG_IDENTIFYING = {**AGG, "prompt": json.dumps({"op": "count", "where": {"medication": "mrn"}})}

DEPT = {
    "doctor": "cardiology",
    "nurse": "emergency",
    "researcher": "research",
    "admin": "general",
    "dept_head": "cardiology",
}

MATRIX = [
    ("doctor", TEXT, 200),
    ("doctor", AGG, 200),
    ("doctor", AGG_IDENTIFYING, 200),
    ("nurse", TEXT, 200),
    ("nurse", AGG, 403),
    ("researcher", TEXT, 403),
    ("researcher", AGG, 200),
    ("researcher", AGG_IDENTIFYING, 403),
    ("admin", TEXT, 403),
    ("admin", AGG, 403),
    ("dept_head", TEXT, 403),
    ("dept_head", AGG, 403),
]


@pytest.fixture(scope="module")
async def client(settings):
    async with (
        FakeAccountant(settings, ok_result),
        running_gateway(
            settings, gateway_settings=GatewaySettings(rate_limit_user=1000), request_timeout_s=5
        ) as (_, c),
    ):
        yield c


@pytest.mark.parametrize(
    ("role", "body", "code"), MATRIX, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(MATRIX)]
)
async def test_default_matrix(settings, client, role, body, code):
    user = f"{role}-{uuid.uuid4().hex[:6]}"
    r = await client.post(
        "/v1/inference", json=body, headers=token(settings, user, role=role, department=DEPT[role])
    )
    assert r.status_code == code, r.text
    if code == 403:
        assert r.json()["detail"]


async def test_denial_is_audited_with_reason(settings, client):
    user = f"nurse-{uuid.uuid4().hex[:6]}"
    async with AuditTap(settings) as tap:
        r = await client.post(
            "/v1/inference",
            json=AGG,
            headers=token(settings, user, role="nurse", department="emergency"),
        )
        assert r.status_code == 403
        assert r.json()["detail"] == "role 'nurse' may not run aggregate queries"
        ev = await tap.wait_for(lambda e: e["action"] == "access.denied" and e["user_id"] == user)
    assert ev is not None
    assert ev["reason"] == r.json()["detail"] and ev["role"] == "nurse"
    assert ev["source_address"] == "10.0.0.1" and ev["outcome"] == "denied"


async def test_deidentified_denial_names_the_fields(settings, client):
    r = await client.post(
        "/v1/inference",
        json={
            **AGG,
            "prompt": json.dumps(
                {"metric": "count", "filter": {"Patient_ID": "123"}, "where": "name = 'x'"}
            ),
        },
        headers=token(settings, "res-1", role="researcher", department="research"),
    )
    assert r.status_code == 403
    assert "Patient_ID" in r.json()["detail"] and "name" in r.json()["detail"]


async def test_matrix_comes_from_config(settings, monkeypatch):
    monkeypatch.setenv(
        "FEDLLM_GATEWAY_ROLES",
        json.dumps({"doctor": ["query", "budget.read.self"], "auditor": ["budget.read.any"]}),
    )
    gw = GatewaySettings()
    assert gw.roles == {"doctor": ["query", "budget.read.self"], "auditor": ["budget.read.any"]}
    async with running_gateway(settings, gateway_settings=gw, request_timeout_s=0.2) as (_, c):
        r = await c.post("/v1/inference", json=AGG, headers=token(settings, "d1"))
        assert r.status_code == 403
        r = await c.get(
            "/v1/privacy/budget/anyone",
            headers=token(settings, "a1", role="auditor", department="general"),
        )
        assert r.status_code == 200
        # A role the matrix no longer has is not a valid identity at all.
        r = await c.get(
            "/v1/privacy/budget/n1",
            headers=token(settings, "n1", role="nurse", department="emergency"),
        )
        assert r.status_code == 401


async def test_unknown_permission_in_config_is_refused(monkeypatch):
    monkeypatch.setenv("FEDLLM_GATEWAY_ROLES", json.dumps({"doctor": ["everything"]}))
    with pytest.raises(ValueError):
        GatewaySettings()

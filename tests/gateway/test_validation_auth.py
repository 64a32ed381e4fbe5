"""401 on missing/bad tokens and 422 on bad bodies, before anything reaches the broker."""

from __future__ import annotations

import pytest

from tests.gateway.peers import running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY = {"prompt": "hello", "max_tokens": 16, "temperature": 0.5, "privacy_budget": 1.0}


@pytest.fixture(scope="module")
async def client(settings):
    async with running_gateway(settings, request_timeout_s=0.3) as (_, c):
        yield c


async def test_missing_token_is_401(client):
    r = await client.post("/v1/inference", json=BODY)
    assert r.status_code == 401
    assert r.json()["detail"] == "missing bearer token"
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("value", ["Bearer nonsense", "Bearer a.b.c", "Basic dXNlcjpwYXNz", ""])
async def test_bad_token_is_401(client, value):
    r = await client.post("/v1/inference", json=BODY, headers={"Authorization": value})
    assert r.status_code == 401


async def test_token_signed_with_other_secret_is_401(client, settings):
    hdrs = token(settings, "u1", secret="another-secret-of-sufficient-length-0123456789")
    r = await client.post("/v1/inference", json=BODY, headers=hdrs)
    assert r.status_code == 401 and r.json()["detail"] == "bad signature"


@pytest.mark.parametrize(
    "patch",
    [
        {"privacy_budget": 0},
        {"privacy_budget": -1},
        {"privacy_budget": 10.5},
        {"privacy_budget": "lots"},
        {"max_tokens": 0},
        {"max_tokens": 257},
        {"temperature": -0.1},
        {"temperature": 9},
        {"prompt": ""},
        {"prompt": "x" * 4001},
        {"prompt": 42},
        {"priority": "asap"},
        {"kind": "delete"},
        {"hospitals": ["nowhere"]},
        {"department": "dermatology"},
        {"unexpected": 1},
    ],
)
async def test_bad_body_is_422(client, settings, patch):
    r = await client.post("/v1/inference", json={**BODY, **patch}, headers=token(settings, "u1"))
    assert r.status_code == 422, r.text
    assert r.json()["detail"]


async def test_missing_budget_is_422(client, settings):
    body = {k: v for k, v in BODY.items() if k != "privacy_budget"}
    r = await client.post("/v1/inference", json=body, headers=token(settings, "u1"))
    assert r.status_code == 422


async def test_not_json_is_422(client, settings):
    r = await client.post(
        "/v1/inference",
        content=b"{not json",
        headers={**token(settings, "u1"), "content-type": "application/json"},
    )
    assert r.status_code == 422


async def test_aggregate_prompt_must_be_json_object(client, settings):
    r = await client.post(
        "/v1/inference",
        headers=token(settings, "u1"),
        json={**BODY, "kind": "aggregate", "prompt": "count patients"},
    )
    assert r.status_code == 422


async def test_other_department_is_403(client, settings):
    r = await client.post(
        "/v1/inference", headers=token(settings, "u1"), json={**BODY, "department": "radiology"}
    )
    assert r.status_code == 403
    assert "own department" in r.json()["detail"]


async def test_token_department_not_configured_is_422(client, settings):
    r = await client.post(
        "/v1/inference", json=BODY, headers=token(settings, "u1", department="dermatology")
    )
    assert r.status_code == 422


# Bodies a JSON parser accepts but the schema refuses, and whose values cannot be rendered back
# as JSON or UTF-8: FastAPI's default handler echoed them and answered 500.
UNRENDERABLE = {
    "nan": b'{"prompt": "hi", "max_tokens": 16, "temperature": NaN, "privacy_budget": 1.0}',
    "infinity": b'{"prompt": "hi", "max_tokens": 16, "privacy_budget": Infinity}',
    "lone surrogate value": b'{"prompt": "\\ud800 hi", "privacy_budget": 1.0}',
    "lone surrogate key": b'{"\\udfff": 1, "prompt": "hi", "privacy_budget": 1.0}',
    "nan in a wrong field": b'{"prompt": "hi", "privacy_budget": "x", "max_tokens": NaN}',
    "top-level array": b"[1, 2]",
    "top-level null": b"null",
}


@pytest.mark.parametrize("body", UNRENDERABLE.values(), ids=UNRENDERABLE.keys())
async def test_unrenderable_bad_body_is_422_without_echo(client, settings, body):
    r = await client.post(
        "/v1/inference",
        content=body,
        headers={**token(settings, "u1"), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert errors and all(set(e) == {"type", "loc", "msg"} for e in errors)
    assert "NaN" not in r.text and "Infinity" not in r.text

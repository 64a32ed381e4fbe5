"""POST /v1/auth/token and hostile bearer tokens: each must be refused with 401."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from fedllm.services.gateway.settings import GatewaySettings
from fedllm.services.gateway.tokens import mint_token
from tests.gateway.peers import SECRET, running_gateway
from tests.security.conftest import PASSWORDS

pytestmark = [
    pytest.mark.asyncio(loop_scope="session"),
    pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning"),
]

OTHER = "an-entirely-different-secret-0123456789-abcdef"


def claims(settings, **kw):
    now = int(time.time())
    base = {
        "sub": "dr_grey",
        "department": "cardiology",
        "role": "doctor",
        "aud": settings.jwt_audience,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def sign_raw(header: dict, payload: dict, key: str) -> str:
    """HS256 over arbitrary header/payload JSON (what PyJWT itself refuses to build)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    mac = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def get_budget(client, headers):
    return await client.get("/v1/privacy/budget/dr_grey", headers=headers)


async def test_token_endpoint_issues_a_short_lived_kid_token(settings, gw):
    async with running_gateway(settings, gateway_settings=gw) as (_, c):
        r = await c.post(
            "/v1/auth/token", json={"username": "dr_grey", "password": PASSWORDS["dr_grey"][2]}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "bearer" and body["expires_in"] == 1800
        header = jwt.get_unverified_header(body["access_token"])
        assert header == {"alg": "HS256", "kid": "k1", "typ": "JWT"}
        payload = jwt.decode(
            body["access_token"], SECRET, algorithms=["HS256"], audience=settings.jwt_audience
        )
        assert payload["exp"] - payload["iat"] == 1800
        assert (payload["sub"], payload["role"], payload["department"]) == (
            "dr_grey",
            "doctor",
            "cardiology",
        )
        ok = await get_budget(c, bearer(body["access_token"]))
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "creds",
    [
        {"username": "dr_grey", "password": "wrong"},
        {"username": "nobody", "password": "whatever"},
        {"username": "dr_grey", "password": PASSWORDS["dr_grey"][2] + " "},
    ],
)
async def test_bad_credentials_are_401(settings, gw, creds):
    async with running_gateway(settings, gateway_settings=gw) as (_, c):
        r = await c.post("/v1/auth/token", json=creds)
    assert r.status_code == 401 and r.json()["detail"] == "invalid credentials"


async def test_disabled_user_gets_no_token(settings, users):
    gw = GatewaySettings(
        users=[u.model_copy(update={"disabled": u.username == "dr_grey"}) for u in users]
    )
    async with running_gateway(settings, gateway_settings=gw) as (_, c):
        r = await c.post(
            "/v1/auth/token", json={"username": "dr_grey", "password": PASSWORDS["dr_grey"][2]}
        )
    assert r.status_code == 401


@pytest.fixture(scope="module")
async def shared_client(settings, users):
    async with running_gateway(
        settings, gateway_settings=GatewaySettings(users=users), request_timeout_s=0.2
    ) as (_, c):
        yield c


def hostile_tokens(settings) -> dict[str, str]:
    good = jwt.encode(claims(settings), SECRET, algorithm="HS256", headers={"kid": "k1"})
    head, _payload, sig = good.split(".")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "alg none": jwt.encode(claims(settings), None, algorithm="none"),
        "alg none with kid": ".".join(
            [b64({"alg": "none", "typ": "JWT", "kid": "k1"}), b64(claims(settings)), ""]
        ),
        "wrong key": jwt.encode(claims(settings), OTHER, algorithm="HS256", headers={"kid": "k1"}),
        "HS512 instead of HS256": jwt.encode(
            claims(settings), SECRET, algorithm="HS512", headers={"kid": "k1"}
        ),
        "RS256 confusion": jwt.encode(
            claims(settings), rsa_key, algorithm="RS256", headers={"kid": "k1"}
        ),
        "expired": jwt.encode(
            claims(settings, exp=int(time.time()) - 120),
            SECRET,
            algorithm="HS256",
            headers={"kid": "k1"},
        ),
        "nbf in future": jwt.encode(
            claims(settings, nbf=int(time.time()) + 3600),
            SECRET,
            algorithm="HS256",
            headers={"kid": "k1"},
        ),
        "wrong audience": jwt.encode(
            claims(settings, aud="someone-else"), SECRET, algorithm="HS256", headers={"kid": "k1"}
        ),
        "no audience": jwt.encode(claims(settings, aud=None), SECRET, algorithm="HS256"),
        "no exp": jwt.encode(claims(settings, exp=None), SECRET, algorithm="HS256"),
        "no role": jwt.encode(claims(settings, role=None), SECRET, algorithm="HS256"),
        "unknown role": jwt.encode(claims(settings, role="superuser"), SECRET, algorithm="HS256"),
        "role not a string": jwt.encode(
            claims(settings, role=["admin"]), SECRET, algorithm="HS256"
        ),
        "unknown kid": jwt.encode(
            claims(settings), SECRET, algorithm="HS256", headers={"kid": "k9"}
        ),
        "kid not a string": sign_raw(
            {"alg": "HS256", "typ": "JWT", "kid": 1}, claims(settings), SECRET
        ),
        "tampered payload": ".".join([head, b64(claims(settings, role="admin", sub="root")), sig]),
        "signature stripped": f"{head}.{_payload}.",
        "garbage": "not-a-jwt",
    }


@pytest.mark.parametrize(
    "case",
    [
        "alg none",
        "alg none with kid",
        "wrong key",
        "HS512 instead of HS256",
        "RS256 confusion",
        "expired",
        "nbf in future",
        "wrong audience",
        "no audience",
        "no exp",
        "no role",
        "unknown role",
        "role not a string",
        "unknown kid",
        "kid not a string",
        "tampered payload",
        "signature stripped",
        "garbage",
    ],
)
async def test_hostile_token_is_401(settings, shared_client, case):
    t = hostile_tokens(settings)[case]
    c = shared_client
    r = await get_budget(c, bearer(t))
    r2 = await c.post(
        "/v1/inference", headers=bearer(t), json={"prompt": "x", "privacy_budget": 1.0}
    )
    assert r.status_code == 401, (case, r.text)
    assert r2.status_code == 401, (case, r2.text)
    assert r.json()["detail"]


async def test_expired_and_immature_reasons(settings, shared_client):
    toks = hostile_tokens(settings)

    async def reason(name: str) -> str:
        return (await get_budget(shared_client, bearer(toks[name]))).json()["detail"]

    assert await reason("expired") == "token expired"
    assert await reason("nbf in future") == "token not yet valid"
    assert await reason("wrong audience") == "wrong audience"
    assert await reason("wrong key") == "bad signature"
    assert await reason("unknown kid") == "unknown signing key"


async def test_two_keys_valid_during_rotation(settings, users):
    new_secret = "the-new-rotated-secret-0123456789-abcdefghij"
    rotated = settings.model_copy(update={"jwt_secret": type(settings.jwt_secret)(new_secret)})
    gw = GatewaySettings(users=users, jwt_kid="k2", jwt_previous_keys={"k1": SECRET})
    old = mint_token(settings, user_id="dr_grey", department="cardiology", role="doctor", kid="k1")
    new = mint_token(rotated, user_id="dr_grey", department="cardiology", role="doctor", kid="k2")
    mixed = mint_token(
        rotated, user_id="dr_grey", department="cardiology", role="doctor", kid="k1"
    )  # new secret under the old kid
    async with running_gateway(rotated, gateway_settings=gw) as (_, c):
        assert (await get_budget(c, bearer(old))).status_code == 200
        assert (await get_budget(c, bearer(new))).status_code == 200
        assert (await get_budget(c, bearer(mixed))).status_code == 401
        issued = (
            await c.post(
                "/v1/auth/token", json={"username": "dr_grey", "password": PASSWORDS["dr_grey"][2]}
            )
        ).json()
        assert jwt.get_unverified_header(issued["access_token"])["kid"] == "k2"
    # Rotation finished: the old key is dropped and its tokens stop working.
    async with running_gateway(rotated, gateway_settings=GatewaySettings(jwt_kid="k2")) as (_, c):
        assert (await get_budget(c, bearer(old))).status_code == 401
        assert (await get_budget(c, bearer(new))).status_code == 200


async def test_placeholder_previous_key_is_refused(settings):
    from fedllm.services.gateway.app import create_app

    with pytest.raises(ValueError, match="placeholder"):
        create_app(
            settings,
            gateway_settings=GatewaySettings(jwt_kid="k2", jwt_previous_keys={"k1": "changeme"}),
        )


async def test_algorithm_none_cannot_be_configured(settings):
    from fedllm.services.gateway.app import create_app

    with pytest.raises(ValueError, match="not allowed"):
        create_app(settings.model_copy(update={"jwt_algorithm": "none"}))

"""Pure parts of Kafka-native identity: the credential header, the shared verifier and RBAC
rule, reservation grants, reply-topic names, and the client's local token checks."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedllm.client.kafka import token_claims
from fedllm.client.models import Answer, AskError
from fedllm.common import grants, identity, topics
from fedllm.common.config import Settings
from fedllm.privacy.accountant import RdpAccountant
from tests.kafka_helpers import inference_request

SETTINGS = Settings(mode="demo")


def principal(role: str = "doctor", department: str = "cardiology") -> identity.Principal:
    roles = identity.default_roles()
    return identity.Principal(
        user_id="u", role=role, department=department, permissions=frozenset(roles[role])
    )


def test_the_gateway_and_the_accountant_share_one_verifier() -> None:
    from fedllm.services.gateway import auth

    assert auth.TokenVerifier is identity.TokenVerifier
    assert auth.AuthError is identity.AuthError


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        ([], None),
        ([("fedllm-schema", b"x")], None),
        ([("authorization", b"Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("Authorization", b"bearer  abc ")], "abc"),
        ([("authorization", b"Basic dXNlcjpwdw==")], ""),
        ([("authorization", b"")], ""),
    ],
)
def test_bearer_from_headers(headers, expected) -> None:
    assert identity.bearer_from_headers(headers) == expected


def test_refusal_for_applies_the_gateways_rules() -> None:
    fields = identity.default_identifying_fields()
    agg = json.dumps({"op": "count"})
    assert (
        identity.refusal_for(
            principal(),
            kind="generate",
            prompt="q",
            department="cardiology",
            identifying_fields=fields,
        )
        == ""
    )
    assert "may not run aggregate" in identity.refusal_for(
        principal("nurse"),
        kind="aggregate",
        prompt=agg,
        department="cardiology",
        identifying_fields=fields,
    )
    assert "may not run generate" in identity.refusal_for(
        principal("researcher"),
        kind="generate",
        prompt="q",
        department="cardiology",
        identifying_fields=fields,
    )
    assert "own department" in identity.refusal_for(
        principal(), kind="generate", prompt="q", department="research", identifying_fields=fields
    )
    assert "mrn" in identity.refusal_for(
        principal("researcher"),
        kind="aggregate",
        prompt=json.dumps({"where": {"mrn": 1}}),
        department="cardiology",
        identifying_fields=fields,
    )
    assert "may not run bogus" in identity.refusal_for(
        principal(), kind="bogus", prompt="q", department="cardiology", identifying_fields=fields
    )


def routed_for(request: dict, hospital: str = "h1", **kw) -> dict:
    out = {
        "request_id": request["request_id"],
        "hospital_id": hospital,
        "attempt": 1,
        "reserved_epsilon": request["epsilon"],
        "delta": request["delta"],
        "deadline_ms": request["deadline_ms"],
        "request": request,
    }
    out.update(kw)
    return out


def test_a_grant_binds_request_hospital_budget_deadline_and_prompt() -> None:
    key = grants.signing_key(SETTINGS)
    public = grants.verify_key(SETTINGS)
    request = inference_request(epsilon=2.0)
    request["grants"] = grants.sign_grants(key, request, ["h1", "h2"])
    assert grants.grant_refusal(public, routed_for(request), "h1") == ""
    assert grants.grant_refusal(public, routed_for(request, "h2"), "h2") == ""
    assert (
        grants.grant_refusal(public, routed_for(request, "h1"), "h2")
        == "routed to another hospital"
    )
    assert (
        grants.grant_refusal(public, routed_for(request, "h3"), "h3")
        == "no reservation grant for this hospital"
    )
    for field, value in (
        ("epsilon", 5.0),
        ("prompt", "other"),
        ("user_id", "mallory"),
        ("deadline_ms", request["deadline_ms"] + 1),
        ("max_tokens", 200),
        ("request_id", "another-id"),
    ):
        tampered = dict(request, **{field: value})
        assert (
            grants.grant_refusal(public, routed_for(tampered), "h1")
            == "reservation grant does not verify"
        ), field
    assert "exceeds" in grants.grant_refusal(
        public, routed_for(request, reserved_epsilon=2.5), "h1"
    )
    assert "delta" in grants.grant_refusal(public, routed_for(request, delta=1e-3), "h1")
    # The carried ρ is not signed: it may not exceed what the signed (ε, δ) reserves.
    rho = RdpAccountant().query_rho(epsilon=request["epsilon"], delta=request["delta"])
    for fine in (0.0, rho, rho / 2):
        assert grants.grant_refusal(public, routed_for(request, reserved_rho=fine), "h1") == ""
    for inflated in (rho * 1.001, float("inf"), float("nan"), -rho):
        assert grants.grant_refusal(public, routed_for(request, reserved_rho=inflated), "h1") == (
            "routed rho exceeds the reservation"
        ), inflated
    assert "share" in grants.grant_refusal(public, routed_for(request, budget_share=2.0), "h1")
    assert "deadline" in grants.grant_refusal(
        public, routed_for(request, deadline_ms=request["deadline_ms"] + 1), "h1"
    )
    forged = Ed25519PrivateKey.generate()
    request["grants"] = grants.sign_grants(forged, request, ["h1"])
    assert (
        grants.grant_refusal(public, routed_for(request), "h1")
        == "reservation grant does not verify"
    )
    request["grants"] = {"h1": "not base64!"}
    assert (
        grants.grant_refusal(public, routed_for(request), "h1")
        == "reservation grant does not verify"
    )


def test_grant_keys_are_required_outside_demo_mode() -> None:
    prod = Settings(mode="prod", jwt_secret="a real secret that is long enough")
    with pytest.raises(ValueError, match="SIGNING_KEY"):
        grants.signing_key(prod)
    with pytest.raises(ValueError, match="VERIFY_KEY"):
        grants.verify_key(prod)
    seed, public = grants.new_keypair()
    configured = Settings(
        mode="prod",
        jwt_secret="a real secret that is long enough",
        reservation_signing_key=seed,
        reservation_verify_key=public,
    )
    request = inference_request()
    request["grants"] = grants.sign_grants(grants.signing_key(configured), request, ["h1"])
    assert grants.grant_refusal(grants.verify_key(configured), routed_for(request), "h1") == ""
    assert len(base64.b64decode(public)) == 32


def test_reply_topics_are_per_user_and_legal() -> None:
    assert topics.reply_topic("alice") == "fedllm.replies.alice"
    assert topics.reply_topic("dr.a_b-1") == "fedllm.replies.dr.a_b-1"
    odd = topics.reply_topic("Ann Smith/ü")
    assert odd.startswith("fedllm.replies.sha256-") and len(odd) < 249
    assert topics.reply_topic("sha256-abc") != "fedllm.replies.sha256-abc"  # no impersonation
    assert topics.reply_topic("a") != topics.reply_topic("b")


def test_client_checks_its_token_locally_and_types_results() -> None:
    from fedllm.common.identity import mint_token

    good = mint_token(SETTINGS, user_id="u", department="general", role="doctor")
    assert token_claims(good)["sub"] == "u"
    with pytest.raises(AskError, match="expired"):
        token_claims(
            mint_token(SETTINGS, user_id="u", department="general", role="doctor", ttl_s=-5)
        )
    with pytest.raises(AskError, match="not a JWT"):
        token_claims("garbage")
    answer = Answer.from_result(
        {
            "request_id": "r",
            "status": "rejected",
            "reason": "no",
            "remaining_budget": -1.0,
            "privacy_cost": 0.0,
        }
    )
    assert answer.status == "rejected" and answer.budget_left is None and not answer.ok

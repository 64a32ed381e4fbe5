"""A request produced straight to the request topic is admitted only on its credential: the
accountant process on the real broker and Postgres, checked against the ledger."""

from __future__ import annotations

import asyncio
import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedllm.common import grants, topics
from fedllm.common.identity import mint_token
from fedllm.common.kafka import ensure_topics
from fedllm.launcher import Pipeline
from tests.accountant.test_service import accountant, ledger_rows, node_result  # noqa: F401
from tests.kafka_helpers import collect, inference_request, produce

pytestmark = pytest.mark.slow


async def final_for(s, rid: str, timeout_s: float = 30) -> dict:
    finals = await collect(
        s,
        topics.RESULTS,
        until=lambda r: any(x["request_id"] == rid for x in r),
        timeout_s=timeout_s,
    )
    mine = [x for x in finals if x["request_id"] == rid]
    assert mine, f"no terminal result for {rid}"
    return mine[0]


async def audit_for(s, rid: str, n: int) -> list[dict]:
    events = await collect(
        s, topics.AUDIT, until=lambda r: sum(a["request_id"] == rid for a in r) >= n, timeout_s=20
    )
    return [a for a in events if a["request_id"] == rid]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "expired",
        "forged",
        "wrong_kid",
        "wrong_audience",
        "mismatched_user",
        "mismatched_department",
        "not_bearer",
    ],
)
async def test_bad_credentials_are_rejected_and_spend_nothing(
    accountant: Pipeline,  # noqa: F811
    case: str,
) -> None:
    s = accountant.settings
    req = inference_request(user_id=f"kafka-{case}", epsilon=2.0)
    claims = {"user_id": req["user_id"], "role": "doctor", "department": "cardiology"}
    token: str | None
    if case == "missing":
        token = None
    elif case == "expired":
        token = mint_token(s, **claims, ttl_s=-120)
    elif case == "forged":
        token = mint_token(s, **claims, secret="an attacker's own secret, long enough")
    elif case == "wrong_kid":
        token = mint_token(s, **claims, kid="k-unknown")
    elif case == "wrong_audience":
        token = mint_token(s.model_copy(update={"jwt_audience": "elsewhere"}), **claims)
    elif case == "mismatched_user":
        token = mint_token(s, **{**claims, "user_id": "kafka-mallory"})
    elif case == "mismatched_department":
        token = mint_token(s, **{**claims, "department": "research"})
    else:
        token = "not-a-jwt"
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"], token=token)
    final = await final_for(s, req["request_id"])
    assert final["status"] == "rejected"
    expected = {
        "missing": "missing credential",
        "expired": "token expired",
        "forged": "bad signature",
        "wrong_kid": "unknown signing key",
        "wrong_audience": "wrong audience",
        "not_bearer": "malformed token",
    }
    if case.startswith("mismatched"):
        assert final["reason"].startswith("credential does not match"), final["reason"]
        owner = "kafka-mallory" if case == "mismatched_user" else req["user_id"]
        assert final["user_id"] == owner  # the verified identity, never the body's
    else:
        assert final["reason"] == expected[case]
        assert final["user_id"] == ""  # no verified identity: copied to nobody's reply topic
    assert final["privacy_cost"] == 0.0 and final["response"] == ""
    await asyncio.sleep(0.5)
    assert ledger_rows(accountant, req["request_id"]) == []  # nothing reserved, nothing spent
    events = await audit_for(s, req["request_id"], 2)
    actions = {a["action"]: a for a in events}
    security = actions.get("auth.failed") or actions.get("access.denied")
    assert security is not None and security["details"]["severity"] == "security"
    assert security["details"]["claimed_user_id"] == req["user_id"]
    assert actions["request.rejected"]["reason"] == final["reason"]
    decisions = await collect(s, topics.DECISIONS, until=lambda r: False, timeout_s=1)
    assert all(d["request_id"] != req["request_id"] for d in decisions)


async def test_identity_comes_from_the_claims_and_the_grant_verifies(accountant: Pipeline) -> None:  # noqa: F811
    s = accountant.settings
    req = inference_request(user_id="", role="", department="", epsilon=1.0, delta=0.5)
    token = mint_token(s, user_id="kafka-claims", role="doctor", department="cardiology")
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key="kafka-claims", token=token)
    decisions = await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    decision = next(d for d in decisions if d["request_id"] == req["request_id"])
    assert decision["approved"]
    inner = decision["request"]
    assert (inner["user_id"], inner["role"], inner["department"]) == (
        "kafka-claims",
        "doctor",
        "cardiology",
    )
    assert inner["delta"] == s.budget.delta  # the deployment's delta, not the client's 0.5
    assert set(inner["grants"]) == {"h1"}
    public = grants.verify_key(s)
    routed = {
        "request_id": inner["request_id"],
        "hospital_id": "h1",
        "reserved_epsilon": 1.0,
        "delta": inner["delta"],
        "deadline_ms": inner["deadline_ms"],
        "request": inner,
    }
    assert grants.grant_refusal(public, routed, "h1") == ""
    other = Ed25519PublicKey.from_public_bytes(base64.b64decode(grants.new_keypair()[1]))
    assert grants.grant_refusal(other, routed, "h1") == "reservation grant does not verify"
    assert ledger_rows(accountant, req["request_id"]) == [("reserved", 0.0)]


async def test_role_permissions_apply_to_kafka_requests(accountant: Pipeline) -> None:  # noqa: F811
    s = accountant.settings
    req = inference_request(
        user_id="kafka-nurse", role="nurse", kind="aggregate", prompt='{"op": "count"}', epsilon=1.0
    )
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    final = await final_for(s, req["request_id"])
    assert final["status"] == "rejected"
    assert final["reason"] == "role 'nurse' may not run aggregate queries"
    assert final["user_id"] == "kafka-nurse"
    assert ledger_rows(accountant, req["request_id"]) == []


async def test_replay_cannot_spend_twice_nor_outlive_its_token(accountant: Pipeline) -> None:  # noqa: F811
    s = accountant.settings
    req = inference_request(user_id="kafka-replay", epsilon=2.0)
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"], times=2)
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == req["request_id"] for d in r),
        timeout_s=30,
    )
    # The same event again, its token now expired: no second result, no second entry.
    expired = mint_token(
        s, user_id="kafka-replay", role="doctor", department="cardiology", ttl_s=-120
    )
    await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"], token=expired)
    # A captured event under a new id with an expired token: refused, nothing spent.
    fresh = dict(req, request_id=req["request_id"][:-4] + "beef")
    await produce(s, topics.REQUESTS, "InferenceRequest", fresh, key=req["user_id"], token=expired)
    assert (await final_for(s, fresh["request_id"]))["reason"] == "token expired"
    # Another user's valid token on this request id: not admitted, no result for it.
    await produce(
        s, topics.REQUESTS, "InferenceRequest", dict(req, user_id="kafka-other"), key="kafka-other"
    )
    refused = await collect(
        s,
        topics.AUDIT,
        until=lambda r: any(
            a["action"] == "request.replay_refused" and a["request_id"] == req["request_id"]
            for a in r
        ),
        timeout_s=20,
    )
    assert any(
        a["action"] == "request.replay_refused" and a["request_id"] == req["request_id"]
        for a in refused
    )
    await asyncio.sleep(1.0)
    assert ledger_rows(accountant, req["request_id"]) == [("reserved", 0.0)]
    assert ledger_rows(accountant, fresh["request_id"]) == []
    finals = await collect(s, topics.RESULTS, until=lambda r: False, timeout_s=1)
    assert all(x["request_id"] != req["request_id"] for x in finals)  # still in flight only


async def test_terminal_results_reach_only_their_owners_reply_topic(accountant: Pipeline) -> None:  # noqa: F811
    s = accountant.settings
    await ensure_topics(s, {topics.reply_topic("kafka-ann"): 1, topics.reply_topic("kafka-ben"): 1})
    ann = inference_request(user_id="kafka-ann", epsilon=1.0)
    ben = inference_request(user_id="kafka-ben", epsilon=50.0)  # refused: over the cap
    for req in (ann, ben):
        await produce(s, topics.REQUESTS, "InferenceRequest", req, key=req["user_id"])
    await collect(
        s,
        topics.DECISIONS,
        until=lambda r: any(d["request_id"] == ann["request_id"] for d in r),
        timeout_s=30,
    )
    await produce(s, topics.NODE_RESULTS, "InferenceResult", node_result(ann), key=ann["user_id"])
    ann_box = await collect(
        s, topics.reply_topic("kafka-ann"), until=lambda r: len(r) >= 1, timeout_s=30
    )
    ben_box = await collect(
        s, topics.reply_topic("kafka-ben"), until=lambda r: len(r) >= 1, timeout_s=30
    )
    assert [x["request_id"] for x in ann_box] == [ann["request_id"]]
    assert ann_box[0]["status"] == "ok" and ann_box[0]["response"] == "an answer"
    assert [x["request_id"] for x in ben_box] == [ben["request_id"]]
    assert ben_box[0]["status"] == "rejected" and "epsilon" in ben_box[0]["reason"]

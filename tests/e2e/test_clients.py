"""The three ways of use against the whole running pipeline: the client library over HTTP and
over Kafka, `fedllm ask`, and every script in examples/ (real broker, Postgres, SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest

from fedllm.client import AskTimeout, HttpClient, KafkaClient
from fedllm.common import topics
from fedllm.common.identity import mint_token
from fedllm.launcher import Pipeline
from tests.e2e.conftest import ROOT
from tests.e2e.test_pipeline import sql
from tests.kafka_helpers import collect, inference_request, produce

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COUNT = json.dumps({"op": "count", "where": {"age_min": 18}})


def token(
    pipeline: Pipeline,
    user: str,
    department: str = "emergency",
    role: str = "doctor",
    ttl_s: int = 1800,
) -> str:
    return mint_token(
        pipeline.settings, user_id=user, department=department, role=role, ttl_s=ttl_s
    )


def kafka(pipeline: Pipeline, user: str, **kw) -> KafkaClient:
    return KafkaClient(token=token(pipeline, user, **kw), settings=pipeline.settings)


def entries(pipeline: Pipeline, user: str) -> list[tuple]:
    return sql(
        pipeline,
        "SELECT request_id, state, spent_epsilon FROM budget_entries WHERE user_id = :u",
        u=user,
    )


def test_kafka_round_trip_is_answered_charged_and_idempotent(pipeline: Pipeline) -> None:
    client = kafka(pipeline, "kc-kafka-ann")
    key = f"kc-{uuid.uuid4()}"
    answer = client.ask(
        "What is the usual treatment for chest pain?",
        epsilon=2.0,
        max_tokens=6,
        timeout_s=240,
        idempotency_key=key,
    )
    assert answer.ok, answer.reason
    assert answer.request_id == key and answer.text.strip() and answer.is_private
    assert 0 < answer.epsilon_spent <= 2.0 + 1e-9
    assert 0 < answer.budget_left < 10.0  # RDP composition: not simply 10 - ε spent
    assert entries(pipeline, "kc-kafka-ann") == [
        (key, "committed", pytest.approx(answer.epsilon_spent))
    ]
    again = client.ask(
        "What is the usual treatment for chest pain?",
        epsilon=2.0,
        max_tokens=6,
        timeout_s=60,
        idempotency_key=key,
    )  # a retry
    assert again == answer
    time.sleep(1.0)
    assert len(entries(pipeline, "kc-kafka-ann")) == 1  # spent once


@pytest.mark.parametrize("case", ["missing", "expired", "forged"])
def test_bad_credentials_on_kafka_are_rejected_with_nothing_spent(
    pipeline: Pipeline, case: str
) -> None:
    s = pipeline.settings
    user = f"kc-bad-{case}"
    req = inference_request(user_id=user, department="emergency", epsilon=1.0, max_tokens=4)
    creds = {
        "missing": None,
        "expired": token(pipeline, user, ttl_s=-120),
        "forged": mint_token(
            s,
            user_id=user,
            department="emergency",
            role="doctor",
            secret="not the deployment's secret at all",
        ),
    }
    asyncio.run(produce(s, topics.REQUESTS, "InferenceRequest", req, key=user, token=creds[case]))
    finals = asyncio.run(
        collect(
            s,
            topics.RESULTS,
            until=lambda r: any(x["request_id"] == req["request_id"] for x in r),
            timeout_s=60,
        )
    )
    final = next(x for x in finals if x["request_id"] == req["request_id"])
    assert final["status"] == "rejected" and final["privacy_cost"] == 0.0
    time.sleep(1.0)
    assert entries(pipeline, user) == []  # the ledger never saw it
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the auditor stores the records asynchronously
        rows = sql(
            pipeline,
            "SELECT action, outcome FROM audit_log WHERE request_id = :r",
            r=req["request_id"],
        )
        if len(rows) >= 2:
            break
        time.sleep(0.5)
    assert ("auth.failed", "denied") in rows and ("request.rejected", "rejected") in rows
    assert not any(a == "request.routed" for a, _ in rows)


def test_a_client_reads_only_its_own_replies(pipeline: Pipeline) -> None:
    ann, ben = kafka(pipeline, "kc-iso-ann"), kafka(pipeline, "kc-iso-ben")

    async def both():
        return await asyncio.gather(
            ann.ask_async(COUNT, kind="aggregate", epsilon=0.5, timeout_s=120),
            ben.ask_async(COUNT, kind="aggregate", epsilon=0.5, timeout_s=120),
        )

    a, b = asyncio.run(both())
    assert a.ok and b.ok, (a.reason, b.reason)
    s = pipeline.settings
    for user, mine in (("kc-iso-ann", a), ("kc-iso-ben", b)):
        box = asyncio.run(
            collect(s, topics.reply_topic(user), until=lambda r: len(r) >= 1, timeout_s=20)
        )
        assert {x["request_id"] for x in box} == {mine.request_id}
        assert {x["user_id"] for x in box} == {user}
    # Ben asking under Ann's request id (as an idempotency key) learns nothing and spends
    # nothing: the id is Ann's, so the accountant admits nothing and Ben's topic stays his.
    with pytest.raises(AskTimeout):
        ben.ask(COUNT, kind="aggregate", epsilon=0.5, timeout_s=8, idempotency_key=a.request_id)
    assert [r[0] for r in entries(pipeline, "kc-iso-ben")] == [b.request_id]


def run_script(pipeline: Pipeline, *args: str, timeout_s: float = 400) -> str:
    env = pipeline.env()
    env.update(
        FEDLLM_URL=pipeline.gateway_url,
        KAFKA_BOOTSTRAP=pipeline.bootstrap,
        DATABASE_URL=pipeline.database_url,
    )
    env.pop("FEDLLM_TOKEN", None)
    done = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fedllm_ask_prints_answer_epsilon_and_budget(pipeline: Pipeline) -> None:
    spent, left = [], []
    for transport in ([], ["--kafka"]):
        out = run_script(
            pipeline,
            "-m",
            "fedllm",
            "ask",
            COUNT,
            "--kind",
            "aggregate",
            "--epsilon",
            "0.5",
            "--as",
            "kc-cli",
            "--department",
            "emergency",
            "--url",
            pipeline.gateway_url,
            *transport,
        )
        line = next(x for x in out.splitlines() if x.startswith("ε spent: "))
        spent.append(float(line.split("ε spent: ")[1].split()[0]))
        left.append(float(line.split("budget left: ")[1].split()[0]))
    assert all(0 < e <= 0.5 for e in spent)
    assert left[1] < left[0] < 10.0  # both charged
    assert len(entries(pipeline, "kc-cli")) == 2


def test_http_client_gives_typed_answers_and_refusals(pipeline: Pipeline) -> None:
    url = pipeline.gateway_url
    key = f"kc-http-{uuid.uuid4()}"
    with HttpClient(url, token=token(pipeline, "kc-http")) as client:
        answer = client.ask(
            COUNT, kind="aggregate", epsilon=0.5, timeout_s=120, idempotency_key=key
        )
        again = client.ask(
            COUNT, kind="aggregate", epsilon=0.5, timeout_s=120, idempotency_key=key
        )  # a retry: the same request, charged once
    assert answer.ok and answer.is_private and answer.node_id
    assert 0 < answer.epsilon_spent <= 0.5
    assert answer.budget_left is not None and 0 < answer.budget_left < 10.0
    assert again.request_id == answer.request_id and again.text == answer.text
    with HttpClient(url, token=token(pipeline, "kc-nurse", role="nurse")) as client:
        refused = client.ask(COUNT, kind="aggregate", epsilon=0.5)
    assert refused.status == "rejected" and "may not run aggregate" in refused.reason
    with HttpClient(url, token=token(pipeline, "kc-http", ttl_s=-120)) as client:
        expired = client.ask(COUNT, kind="aggregate", epsilon=0.5)
    assert (expired.status, expired.reason) == ("rejected", "token expired")
    assert len(entries(pipeline, "kc-http")) == 1


def test_example_ask_http(pipeline: Pipeline) -> None:
    out = run_script(pipeline, "examples/ask_http.py", "What is hypertension?")
    assert "status:      ok" in out and "ε spent:" in out and "budget left:" in out


def test_example_ask_kafka(pipeline: Pipeline) -> None:
    out = run_script(pipeline, "examples/ask_kafka.py", "Which drugs treat angina?")
    assert out.startswith("ok: ") and "ε spent:" in out and "budget left:" in out


def test_example_aggregate_query(pipeline: Pipeline) -> None:
    out = run_script(pipeline, "examples/aggregate_query.py")
    assert "release:" in out and "ε spent:" in out


def test_example_replay_audit_verifies_the_chain(pipeline: Pipeline) -> None:
    out = run_script(pipeline, "examples/replay_audit.py")
    assert "replayed: OK chain" in out and "live: OK chain" in out, out

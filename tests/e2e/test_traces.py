"""One trace id spans every hop of a request: gateway → accountant → router → node → accountant
→ gateway, and the auditor — in the Kafka headers of every record of the request, and in the
spans every service process exports over OTLP to a test collector."""

from __future__ import annotations

import asyncio
import secrets
import time

import httpx
import pytest

from fedllm.common import codec, topics
from fedllm.common.tracing import trace_id_of
from fedllm.launcher import Pipeline
from tests.e2e.conftest import ask_body, bearer
from tests.kafka_helpers import collect
from tests.ops.otlp import Collector

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPECTED_SPANS = {  # (service.name prefix, span name) of each hop
    ("fedllm-gateway", "gateway POST"),
    ("fedllm-accountant", "accountant InferenceRequest"),
    ("fedllm-router", "router BudgetDecision"),
    ("fedllm-node-", "node_worker RoutedRequest"),
    ("fedllm-accountant", "accountant InferenceResult"),
    ("fedllm-gateway", f"gateway {topics.RESULTS}"),
    ("fedllm-auditor", "auditor AuditEvent"),
}


def records_of(pipeline: Pipeline, topic: str, request_id: str) -> list:
    def mine(msgs: list) -> list:
        out = []
        for m in msgs:
            try:
                if codec.decode(m.value, m.headers)[1].get("request_id") == request_id:
                    out.append(m)
            except codec.DecodeError:
                continue
        return out

    return mine(
        asyncio.run(
            collect(
                pipeline.settings,
                topic,
                raw=True,
                timeout_s=20,
                until=lambda msgs: bool(mine(msgs)),
            )
        )
    )


def ask(pipeline: Pipeline, client: httpx.Client, user: str, **headers: str) -> dict:
    r = client.post(
        "/v1/inference",
        headers=bearer(pipeline, user, "cardiology") | headers,
        json=ask_body(
            "What is the usual treatment for angina?",
            epsilon=1.0,
            department="cardiology",
            max_tokens=2,
        ),
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_one_trace_id_spans_every_hop(
    pipeline: Pipeline, client: httpx.Client, otlp_collector: Collector
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = ask(pipeline, client, "e2e-trace", traceparent=f"00-{trace_id}-{client_span}-01")
    rid, node = body["request_id"], body["node_id"]
    hops = [
        topics.REQUESTS,
        topics.DECISIONS,
        topics.hospital_requests(node),
        topics.NODE_RESULTS,
        topics.RESULTS,
    ]
    for topic in hops:
        recs = records_of(pipeline, topic, rid)
        assert recs, f"no record of {rid} on {topic}"
        assert {trace_id_of(m.headers) for m in recs} == {trace_id}, topic
    audit = records_of(pipeline, topics.AUDIT, rid)
    assert {trace_id_of(m.headers) for m in audit} == {trace_id}
    services = {codec.decode(m.value, m.headers)[1]["service"] for m in audit}
    assert {"gateway", "accountant", "router"} <= services and len(services) >= 4, services

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = [s for s in otlp_collector.spans() if s.trace_id == trace_id]
        seen = {
            (svc, s.name)
            for s in spans
            for svc, name in EXPECTED_SPANS
            if s.service.startswith(svc) and s.name == name
        }
        if seen == EXPECTED_SPANS:
            break
        time.sleep(0.5)
    assert seen == EXPECTED_SPANS, EXPECTED_SPANS - seen
    time.sleep(2)  # stragglers: spans that end after the ones above
    spans = [s for s in otlp_collector.spans() if s.trace_id == trace_id]
    ids = {s.span_id for s in spans}
    orphans = [
        (s.service, s.name, s.parent_id)
        for s in spans
        if s.parent_id not in ids and s.parent_id != client_span
    ]
    assert not orphans, f"spans outside the request's tree: {orphans}"
    roots = [(s.service, s.name) for s in spans if s.parent_id == client_span]
    assert len(roots) == 1 and roots[0][0] == "fedllm-gateway", roots  # one tree


def test_the_gateway_starts_a_trace_when_the_client_sends_none(
    pipeline: Pipeline, client: httpx.Client
) -> None:
    body = ask(pipeline, client, "e2e-trace-2")
    first = records_of(pipeline, topics.REQUESTS, body["request_id"])
    trace_id = trace_id_of(first[0].headers)
    assert len(trace_id) == 32 and int(trace_id, 16) != 0
    last = records_of(pipeline, topics.RESULTS, body["request_id"])
    assert {trace_id_of(m.headers) for m in last} == {trace_id}

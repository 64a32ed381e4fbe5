"""One Answer whichever transport carried the result: the Kafka client reads the terminal
InferenceResult, the HTTP client the body the gateway's ``_respond`` builds from that same
record; both go through ``Answer.from_result``."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse

from fedllm.client import Answer, AskError, HttpClient
from fedllm.common import codec
from fedllm.services.gateway.metrics import GatewayMetrics
from fedllm.services.gateway.routes_inference import _respond


def result(status: str, **fields: Any) -> dict[str, Any]:
    """A terminal InferenceResult as a consumer decodes it (every field, defaults filled)."""
    rec = {
        "request_id": "req-1",
        "user_id": "ann",
        "department": "cardiology",
        "status": status,
        "finished_at_ms": 1_700_000_000_000,
        **fields,
    }
    return codec.decode_expect("InferenceResult", *codec.encode("InferenceResult", rec))


def over_http(record: dict[str, Any]) -> Answer:
    """What HttpClient.ask returns when the gateway answers with ``_respond(record)``."""
    state = SimpleNamespace(metrics=GatewayMetrics())
    out = _respond(state, record["request_id"], record, started=0.0)  # type: ignore[arg-type]
    if isinstance(out, JSONResponse):
        code, body = out.status_code, bytes(out.body)
    else:
        code, body = 200, out.model_dump_json().encode()

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/inference"
        assert json.loads(request.content)["privacy_budget"] == 1.0
        return httpx.Response(code, content=body, headers={"content-type": "application/json"})

    client = HttpClient("http://gateway", token="t")
    client._http = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    with client:
        return client.ask("q", epsilon=1.0)


OK = result(
    "ok",
    response="Lisinopril.",
    node_id="st_mary",
    is_private=True,
    privacy_cost=0.75,
    remaining_budget=4.25,
    tokens=3,
    processing_time_ms=12.0,
)


def test_an_ok_answer_is_the_same_over_both_transports() -> None:
    want = Answer(
        request_id="req-1",
        status="ok",
        text="Lisinopril.",
        epsilon_spent=0.75,
        budget_left=4.25,
        node_id="st_mary",
        is_private=True,
        tokens=3,
    )
    assert Answer.from_result(OK) == want
    assert over_http(OK) == want


def test_an_unknown_remaining_budget_is_none_over_both_transports() -> None:
    rec = {**OK, "remaining_budget": -1.0}  # the accountant did not say
    assert Answer.from_result(rec).budget_left is None
    assert over_http(rec).budget_left is None


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("rejected", "budget exhausted"),
        ("failed", "no hospital answered"),
        ("timeout", "deadline passed"),
    ],
)
def test_refusals_and_failures_carry_status_and_reason(status: str, reason: str) -> None:
    rec = result(status, reason=reason, remaining_budget=0.5 if status == "rejected" else -1.0)
    kafka, http = Answer.from_result(rec), over_http(rec)
    for a in (kafka, http):
        assert (a.status, a.reason, a.text, a.epsilon_spent, a.ok) == (
            status,
            reason,
            "",
            0.0,
            False,
        )
        assert a.budget_left == (0.5 if status == "rejected" else None)
    assert kafka.request_id == "req-1"
    assert http.request_id == ("req-1" if status == "timeout" else "")  # as the gateway says


def test_a_status_code_without_an_answer_raises() -> None:
    # consensus unavailable: the gateway's 409 is no terminal answer, the client raises
    rec = result("failed", reason="consensus unavailable: 1 of 2 hospitals")
    with pytest.raises(AskError) as err:
        over_http(rec)
    assert err.value.status_code == 409 and "consensus unavailable" in err.value.detail

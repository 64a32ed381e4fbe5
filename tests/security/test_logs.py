"""Logs never carry prompts, answers, passwords or tokens, even at DEBUG."""

from __future__ import annotations

import logging

import pytest

from fedllm.services.gateway.settings import GatewaySettings
from tests.gateway.peers import FakeAccountant, ok_result, running_gateway, token
from tests.security.conftest import PASSWORDS

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "PROMPT-CANARY-7f3a patient with chest pain"
ANSWER = "ANSWER-CANARY-91bc consider troponin"


async def test_no_secrets_or_clinical_text_in_logs(settings, users, caplog):
    caplog.set_level(logging.DEBUG)
    gw = GatewaySettings(users=users, lockout_user_failures=2)
    hdrs = token(settings, "dr_grey")
    bad_token = hdrs["Authorization"][:-4] + "AAAA"

    def answer(req):
        return ok_result(req, response=ANSWER)

    async with (
        FakeAccountant(settings, answer),
        running_gateway(settings, gateway_settings=gw) as (_, c),
    ):
        r = await c.post(
            "/v1/inference", headers=hdrs, json={"prompt": PROMPT, "privacy_budget": 0.1}
        )
        assert r.status_code == 200 and r.json()["response"] == ANSWER
        assert (
            await c.post(
                "/v1/inference",
                json={"prompt": PROMPT, "privacy_budget": 0.1},
                headers={"Authorization": bad_token},
            )
        ).status_code == 401
        issued = await c.post(
            "/v1/auth/token", json={"username": "dr_grey", "password": PASSWORDS["dr_grey"][2]}
        )
        assert issued.status_code == 200
        for _ in range(3):
            await c.post(
                "/v1/auth/token", json={"username": "dr_grey", "password": "WRONG-PASSWORD-CANARY"}
            )
    text = caplog.text + "".join(str(rec.args) for rec in caplog.records)
    assert caplog.records, "expected some log output at DEBUG"
    for secret in (
        PROMPT,
        ANSWER,
        PASSWORDS["dr_grey"][2],
        "WRONG-PASSWORD-CANARY",
        hdrs["Authorization"].split()[1],
        bad_token.split()[1],
        issued.json()["access_token"],
        settings.jwt_secret.get_secret_value(),
    ):
        assert secret not in text


async def test_json_lines_carry_service_and_request_id_and_no_secrets(settings, users):
    """The production log format: one JSON object per line with service and request id."""
    import asyncio
    import io
    import json

    from fedllm.common import metrics
    from fedllm.common.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("gateway"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    hdrs = token(settings, "dr_grey")
    try:
        async with (
            FakeAccountant(settings, lambda req: ok_result(req, response=ANSWER)),
            running_gateway(settings, gateway_settings=GatewaySettings(users=users)) as (_, c),
        ):
            r = await c.post(
                "/v1/inference", headers=hdrs, json={"prompt": PROMPT, "privacy_budget": 0.1}
            )
            assert r.status_code == 200
        log = logging.getLogger("fedllm.test")

        async def handle(request_id: str) -> None:  # concurrent stages keep their own ids
            with metrics.stage("router", "BudgetDecision", request_id=request_id):
                await asyncio.sleep(0.01)
                log.warning("routed %s", request_id)
                log.warning("client sent Authorization: Bearer %s", hdrs["Authorization"][7:])

        await asyncio.gather(handle("req-A"), handle("req-B"))
        log.info("outside any request")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines
    for line in lines:
        assert line["service"] == "gateway" and line["level"] and "msg" in line
    routed = [line for line in lines if line["msg"].startswith("routed ")]
    assert {(line["msg"][7:], line["request_id"]) for line in routed} == {
        ("req-A", "req-A"),
        ("req-B", "req-B"),
    }
    outside = next(line for line in lines if line["msg"] == "outside any request")
    assert "request_id" not in outside
    inference_id = r.json()["request_id"]
    assert any(line.get("request_id") == inference_id for line in lines), (
        "the gateway's lines for an inference carry its request id"
    )
    for secret in (
        PROMPT,
        ANSWER,
        hdrs["Authorization"].split()[1],
        settings.jwt_secret.get_secret_value(),
    ):
        assert secret not in text

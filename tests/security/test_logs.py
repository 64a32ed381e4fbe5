"""Logs never carry prompts, answers, passwords or tokens, even at DEBUG."""

from __future__ import annotations

import logging

import pytest

from services.gateway.settings import GatewaySettings
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

    async with FakeAccountant(settings, answer), \
            running_gateway(settings, gateway_settings=gw) as (_, c):
        r = await c.post("/v1/inference", headers=hdrs,
                         json={"prompt": PROMPT, "privacy_budget": 0.1})
        assert r.status_code == 200 and r.json()["response"] == ANSWER
        assert (await c.post("/v1/inference", json={"prompt": PROMPT, "privacy_budget": 0.1},
                             headers={"Authorization": bad_token})).status_code == 401
        issued = await c.post("/v1/auth/token", json={"username": "dr_grey",
                                                      "password": PASSWORDS["dr_grey"][2]})
        assert issued.status_code == 200
        for _ in range(3):
            await c.post("/v1/auth/token", json={"username": "dr_grey",
                                                 "password": "WRONG-PASSWORD-CANARY"})
    text = caplog.text + "".join(str(rec.args) for rec in caplog.records)
    assert caplog.records, "expected some log output at DEBUG"
    for secret in (PROMPT, ANSWER, PASSWORDS["dr_grey"][2], "WRONG-PASSWORD-CANARY",
                   hdrs["Authorization"].split()[1], bad_token.split()[1],
                   issued.json()["access_token"], settings.jwt_secret.get_secret_value()):
        assert secret not in text

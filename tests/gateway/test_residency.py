"""Data residency at the gateway: a named hospital outside the user's regions is a 403 before
anything is sent; the token's regions travel on the request for the router to enforce."""

from __future__ import annotations

import pytest

from fedllm.common.config import HospitalConfig
from tests.gateway.peers import FakeAccountant, make_settings, ok_result, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY = {"prompt": "hello", "max_tokens": 16, "temperature": 0.5, "privacy_budget": 1.0}


@pytest.fixture(scope="module")
def eu_settings(settings):
    return make_settings(
        settings.kafka_bootstrap,
        hospitals=[
            HospitalConfig(id="st_mary", departments=["cardiology"], region="EU"),
            HospitalConfig(id="boston", departments=["cardiology"], region="US"),
        ],
        department_regions={"cardiology": ["EU"]},
    )


async def test_named_hospital_outside_the_region_is_403(eu_settings):
    async with running_gateway(eu_settings) as (_, c):
        r = await c.post(
            "/v1/inference",
            json={**BODY, "hospitals": ["boston"]},
            headers=token(eu_settings, "u1"),
        )
    assert r.status_code == 403 and "data residency: boston" in r.json()["detail"]


async def test_token_regions_travel_on_the_request(eu_settings):
    async with (
        FakeAccountant(eu_settings, ok_result) as acct,
        running_gateway(eu_settings) as (_, c),
    ):
        r = await c.post(
            "/v1/inference",
            json={**BODY, "hospitals": ["st_mary"]},
            headers=token(eu_settings, "u-eu", regions=["EU"]),
        )
        assert r.status_code == 200, r.text
        (seen,) = [q for q in acct.seen if q["user_id"] == "u-eu"]
    assert seen["allowed_regions"] == ["EU"]

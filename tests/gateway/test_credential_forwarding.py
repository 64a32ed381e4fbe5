"""The gateway forwards the caller's own bearer token with the request event, so the
accountant can verify it again (fedllm.common.identity) before it reserves anything."""

from __future__ import annotations

import uuid

import pytest

from fedllm.common import codec, topics
from fedllm.common.identity import bearer_from_headers
from tests.gateway.peers import FakeAccountant, ok_result, running_gateway, token
from tests.kafka_helpers import collect

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_request_event_carries_the_callers_token(settings):
    user = f"u-{uuid.uuid4().hex[:10]}"
    headers = token(settings, user)
    async with FakeAccountant(settings, ok_result), running_gateway(settings) as (_, c):
        r = await c.post(
            "/v1/inference",
            headers=headers,
            json={"prompt": "q", "max_tokens": 4, "temperature": 0.2, "privacy_budget": 0.5},
        )
        assert r.status_code == 200, r.text
    rid = r.json()["request_id"]

    def mine(msgs):
        out = []
        for m in msgs:
            try:  # other tests poison this topic on purpose
                if codec.decode(m.value, m.headers)[1]["request_id"] == rid:
                    out.append(m)
            except codec.DecodeError:
                continue
        return out

    [msg] = mine(
        await collect(
            settings, topics.REQUESTS, raw=True, until=lambda ms: bool(mine(ms)), timeout_s=20
        )
    )
    assert bearer_from_headers(msg.headers) == headers["Authorization"].split(" ", 1)[1]

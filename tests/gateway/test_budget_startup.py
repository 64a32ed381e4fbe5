"""The gateway's budget view starts at the current window: start-up does not grow with history."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from fedllm.common import codec, topics
from fedllm.common.kafka import make_producer
from fedllm.services.gateway.correlator import BudgetView
from tests.gateway.peers import budget_status, prepare_topics

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_budget_view_skips_spent_windows(settings):
    await prepare_topics(settings)
    old_user, new_user = f"old-{uuid.uuid4().hex[:8]}", f"new-{uuid.uuid4().hex[:8]}"
    day = settings.budget.window_seconds
    yesterday = int(time.time()) // day * day - day
    producer = make_producer(settings)
    await producer.start()
    try:
        old = budget_status(
            old_user, "cardiology", spent=3.0, window_start=yesterday, window_seconds=day
        )
        value, headers = codec.encode("BudgetStatus", old)
        await producer.send_and_wait(
            topics.scoped(settings, topics.BUDGETS),
            value=value,
            key=old_user.encode(),
            headers=headers,
            timestamp_ms=(yesterday + 60) * 1000,
        )
        new = budget_status(new_user, "cardiology", spent=1.0)
        value, headers = codec.encode("BudgetStatus", new)
        await producer.send_and_wait(
            topics.scoped(settings, topics.BUDGETS),
            value=value,
            key=new_user.encode(),
            headers=headers,
        )
    finally:
        await producer.stop()
    view = BudgetView(settings)
    await view.start()
    try:
        deadline = time.monotonic() + 10
        while new_user not in view.user_to_status and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await view.stop()
    assert view.user_to_status[new_user]["user_spent_epsilon"] == 1.0
    assert old_user not in view.user_to_status

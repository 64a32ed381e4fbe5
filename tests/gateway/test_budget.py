"""GET /v1/privacy/budget/{user_id} from BudgetStatus snapshots on the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.gateway.peers import FakeAccountant, budget_status, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")


def uid() -> str:
    return f"b-{uuid.uuid4().hex[:10]}"


async def eventually(fn, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        r = await fn()
        if r is not None or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.05)


async def test_unknown_user_gets_full_budget(settings):
    user, dept = uid(), uid()  # a department no other test on the shared broker has charged
    budget = settings.budget.model_copy(
        update={"department_epsilon": {**settings.budget.department_epsilon, dept: 7.5}}
    )
    settings = settings.model_copy(update={"budget": budget})
    async with running_gateway(settings) as (_, c):
        r = await c.get(
            f"/v1/privacy/budget/{user}", headers=token(settings, user, department=dept)
        )
    assert r.status_code == 200
    body = r.json()
    assert body["user_id"] == user and body["department"] == dept
    assert body["limit"] == body["remaining"] == settings.budget.user_epsilon
    assert body["spent"] == 0.0
    assert body["department_remaining"] == 7.5
    window = settings.budget.window_seconds
    assert body["window_start"] == int(time.time()) // window * window


async def test_latest_snapshot_is_served(settings):
    user = uid()
    async with (
        FakeAccountant(settings, lambda r: None) as acct,
        running_gateway(settings) as (_, c),
    ):
        await acct.publish_budget(budget_status(user, "cardiology", spent=1.0))
        await acct.publish_budget(budget_status(user, "cardiology", spent=2.5, dept_remaining=11.0))

        async def read():
            r = await c.get(f"/v1/privacy/budget/{user}", headers=token(settings, user))
            return r if r.json()["spent"] == 2.5 else None

        r = await eventually(read)
    assert r is not None
    body = r.json()
    assert body["remaining"] == 7.5 and body["limit"] == 10.0
    assert body["department_remaining"] == 11.0


async def test_snapshot_from_an_older_window_means_full_budget(settings):
    user = uid()
    old_start = int(time.time()) - 3 * 86_400
    async with FakeAccountant(settings, lambda r: None) as acct:
        await acct.publish_budget(
            budget_status(user, "cardiology", spent=9.0, window_start=old_start)
        )
        # A fresh gateway reads BUDGETS from the current window's start and skips snapshots
        # of spent windows (test_budget_startup.py), so the old snapshot is never served.
        async with running_gateway(settings) as (app, c):
            await asyncio.sleep(0.5)
            assert user not in app.state.gateway.budgets.user_to_status
            r = await c.get(f"/v1/privacy/budget/{user}", headers=token(settings, user))
    body = r.json()
    assert body["spent"] == 0.0 and body["remaining"] == 10.0
    assert body["window_start"] > old_start


async def test_reading_someone_elses_budget_is_403(settings):
    async with running_gateway(settings) as (_, c):
        r = await c.get(f"/v1/privacy/budget/{uid()}", headers=token(settings, uid()))
    assert r.status_code == 403
    assert r.json()["detail"] == "may not read another user's budget"


async def test_admin_reads_anyone(settings):
    user = uid()
    async with running_gateway(settings) as (_, c):
        r = await c.get(
            f"/v1/privacy/budget/{user}",
            headers=token(settings, "root", role="admin", department="admin"),
        )
    assert r.status_code == 200 and r.json()["user_id"] == user


async def test_dept_head_reads_own_department_only(settings):
    mine, theirs = uid(), uid()
    async with (
        FakeAccountant(settings, lambda r: None) as acct,
        running_gateway(settings) as (app, c),
    ):
        await acct.publish_budget(budget_status(mine, "cardiology", spent=1.0))
        await acct.publish_budget(budget_status(theirs, "radiology", spent=1.0))
        view = app.state.gateway.budgets
        for _ in range(100):
            if mine in view.user_to_status and theirs in view.user_to_status:
                break
            await asyncio.sleep(0.05)
        head = token(settings, "head", role="dept_head", department="cardiology")
        r_mine = await c.get(f"/v1/privacy/budget/{mine}", headers=head)
        r_theirs = await c.get(f"/v1/privacy/budget/{theirs}", headers=head)
        r_unknown = await c.get(f"/v1/privacy/budget/{uid()}", headers=head)
    assert r_mine.status_code == 200 and r_mine.json()["spent"] == 1.0
    assert r_theirs.status_code == 403
    assert r_unknown.status_code == 403


async def test_budget_needs_a_token(settings):
    async with running_gateway(settings) as (_, c):
        r = await c.get("/v1/privacy/budget/someone")
    assert r.status_code == 401


async def test_seed_budget_fields_and_privacy_status(settings):
    user = uid()
    async with running_gateway(settings) as (_, c):
        hdrs = token(settings, user)
        body = (await c.get(f"/v1/privacy/budget/{user}", headers=hdrs)).json()
        status = await c.get("/v1/privacy/status", headers=hdrs)
        unauth = await c.get("/v1/privacy/status")
    window = settings.budget.window_seconds
    assert body["success"] is True
    assert body["total_budget"] == body["limit"] and body["consumed"] == body["spent"] == 0.0
    assert body["daily_limit"] == pytest.approx(body["limit"] * 86_400 / window)
    assert body["last_refresh"] == body["window_start"]
    assert body["next_refresh"] == body["window_start"] + window
    assert status.status_code == 200 and unauth.status_code == 401
    s = status.json()
    assert s["success"] and s["user"]["user_id"] == user and s["delta"] == settings.budget.delta
    assert s["department_limit"] == settings.budget.department_epsilon["cardiology"]

"""Running zCDP sums: exact, O(1) in history, correct under every isolation level and with
two accountants racing on the same request id (real Postgres; SQLite where it applies)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, event, text

from fedllm.common.config import BudgetConfig
from fedllm.common.db import make_engine, normalise_url
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.services.accountant.ledger import Ledger, Settlement, dept_scope, user_scope
from tests.kafka_helpers import inference_request


def new_ledger(url: str, **engine_kw) -> Ledger:
    if url.startswith("sqlite"):
        return Ledger(make_engine(url), BudgetConfig(), RdpAccountant())
    return Ledger(create_engine(normalise_url(url), **engine_kw), BudgetConfig(), RdpAccountant())


@pytest.fixture(params=["postgres", "sqlite"])
def url(request, fresh_database_url, tmp_path) -> str:
    return fresh_database_url if request.param == "postgres" else f"sqlite:///{tmp_path}/l.db"


def assert_sums_exact(ledger: Ledger, users: set[str], depts: set[str]) -> None:
    window = ledger._window()
    for scope in [user_scope(u) for u in users] + [dept_scope(d) for d in depts]:
        assert ledger.charged(scope, window=window) == ledger.recompute(scope, window=window)


def test_random_operations_keep_running_sums_exact(url: str) -> None:
    ledger, rng = new_ledger(url), random.Random(7)
    users, depts = {"a", "b", "c"}, {"emergency", "cardiology"}
    reserved: list[str] = []
    for step in range(120):
        op = rng.random()
        if op < 0.5 or not reserved:
            req = inference_request(
                user_id=rng.choice(sorted(users)),
                department=rng.choice(sorted(depts)),
                epsilon=rng.choice([0.05, 0.3, 1.0]),
            )
            if ledger.reserve(req).state == "reserved":
                reserved.append(req["request_id"])
        elif op < 0.9:
            rid = reserved.pop(rng.randrange(len(reserved)))
            spent = PrivacyCurve.from_rho(rng.uniform(0, 0.02)) if rng.random() < 0.7 else None
            ledger.settle(rid, spent=spent, outcome="ok" if spent else "failed")
        else:
            scope = rng.choice(["user", "department"])
            subject = rng.choice(sorted(users if scope == "user" else depts))
            ledger.reset(
                {
                    "adjustment_id": f"adj-{step}",
                    "action": "reset",
                    "scope": scope,
                    "subject": subject,
                    "reason": "",
                    "actor_user_id": "admin",
                }
            )
        assert_sums_exact(ledger, users, depts)


def test_settling_after_a_reset_leaves_the_reset_account_alone(url: str) -> None:
    ledger = new_ledger(url)
    req = inference_request(user_id="r", department="research", epsilon=1.0)
    ledger.reserve(req)
    ledger.reset(
        {
            "adjustment_id": "adj",
            "action": "reset",
            "scope": "department",
            "subject": "research",
            "reason": "",
            "actor_user_id": "admin",
        }
    )
    out = ledger.settle(req["request_id"], spent=PrivacyCurve.from_rho(0.01), outcome="ok")
    assert out is not None and out.department.spent == 0.0 and out.user.spent > 0
    assert_sums_exact(ledger, {"r"}, {"research"})


def test_a_decision_reads_no_history(url: str) -> None:
    """The statements a reservation runs are the same with 0 or 500 earlier entries of the same
    user and department in the window, and none of them scans entries by user/department."""
    ledger = new_ledger(url)

    def statements_of_one_reserve() -> list[str]:
        seen: list[str] = []

        def record(conn, cursor, statement, *_):  # noqa: ANN001
            seen.append(statement)

        event.listen(ledger.engine, "before_cursor_execute", record)
        try:
            ledger.reserve(inference_request(user_id="h", department="emergency", epsilon=1e-4))
        finally:
            event.remove(ledger.engine, "before_cursor_execute", record)
        return seen

    fresh = statements_of_one_reserve()
    ledger.reserve_many(
        [inference_request(user_id="h", department="emergency", epsilon=1e-4) for _ in range(500)]
    )
    after = statements_of_one_reserve()
    assert len(after) == len(fresh)
    for stmt in after:
        if "budget_entries" in stmt and stmt.lstrip().upper().startswith("SELECT"):
            assert "request_id IN" in stmt and "user_id =" not in stmt
            assert "department =" not in stmt and "window_start =" not in stmt


def test_batch_is_decided_in_order_with_replays(url: str) -> None:
    ledger = new_ledger(url)
    first = inference_request(user_id="x", department="research", epsilon=1.5)
    second = inference_request(user_id="y", department="research", epsilon=1.5)
    unknown = inference_request(user_id="z", department="astrology", epsilon=0.1)
    outs = ledger.reserve_many([first, second, first, unknown])
    assert [o.state for o in outs] == ["reserved", "rejected", "reserved", "rejected"]
    assert [o.changed for o in outs] == [True, True, False, True]
    assert "department privacy budget exhausted" in outs[1].reason
    assert_sums_exact(ledger, {"x", "y"}, {"research"})


def test_a_report_above_the_reservation_is_charged_and_flagged(url: str) -> None:
    ledger = new_ledger(url)
    req = inference_request(user_id="o", department="emergency", epsilon=1.0)
    reserved = ledger.reserve(req)
    rho_res = reserved.entry["reserved_units"] / 1e15
    over = PrivacyCurve.from_rho(2 * rho_res)
    out = ledger.settle_many([Settlement(req["request_id"], over, "ok")])[0]
    assert out is not None and out.changed
    assert out.excess_rho == pytest.approx(rho_res, rel=1e-9)
    window = ledger._window()
    assert ledger.charged(user_scope("o"), window=window) == ledger.filter.charge_units(over)
    within = inference_request(user_id="o2", department="emergency", epsilon=1.0)
    ledger.reserve(within)
    ok = ledger.settle(within["request_id"], spent=PrivacyCurve.from_rho(rho_res / 3), outcome="ok")
    assert ok is not None and ok.excess_rho == 0.0


ISOLATION = ["read committed", "repeatable read", "serializable"]


@pytest.mark.parametrize("isolation", ISOLATION)
def test_forty_concurrent_requests_of_one_user_never_overspend(
    isolation: str, fresh_database_url: str
) -> None:
    """The database's default isolation set per session (as a DBA would), 40 threads."""
    opts = {"options": "-c default_transaction_isolation=" + isolation.replace(" ", "\\ ")}
    ledger = new_ledger(fresh_database_url, connect_args=opts, pool_size=40, max_overflow=0)
    with ledger.engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == isolation
    f = ledger.filter
    one = f.query_units(2.0)
    fits = f.limit_units(ledger.budget.user_epsilon) // one  # 16 of 40: the user's limit binds
    assert fits < 40 and fits < f.limit_units(ledger.budget.department_epsilon["emergency"]) // one
    reqs = [
        inference_request(user_id="solo", department="emergency", epsilon=2.0) for _ in range(40)
    ]
    barrier = threading.Barrier(40)

    def go(req: dict):
        barrier.wait()
        return ledger.reserve(req)

    with ThreadPoolExecutor(max_workers=40) as pool:
        outcomes = list(pool.map(go, reqs))
    assert sum(o.state == "reserved" for o in outcomes) == fits
    assert all(o.state in ("reserved", "rejected") for o in outcomes)
    window = ledger._window()
    charged = ledger.charged(user_scope("solo"), window=window)
    assert charged == fits * one <= f.limit_units(ledger.budget.user_epsilon)
    assert charged == ledger.recompute(user_scope("solo"), window=window)


@pytest.mark.parametrize("isolation", ISOLATION)
def test_two_accountants_racing_on_one_request_id(isolation: str, fresh_database_url: str) -> None:
    opts = {"options": "-c default_transaction_isolation=" + isolation.replace(" ", "\\ ")}
    a = new_ledger(fresh_database_url, connect_args=opts)
    b = new_ledger(fresh_database_url, connect_args=opts)
    for _ in range(15):
        req = inference_request(
            user_id=f"dup-{uuid.uuid4().hex[:6]}", department="cardiology", epsilon=0.5
        )
        barrier = threading.Barrier(2)

        def go(ledger: Ledger, req: dict = req, barrier: threading.Barrier = barrier):
            barrier.wait()
            return ledger.reserve(req)

        with ThreadPoolExecutor(max_workers=2) as pool:
            outs = list(pool.map(go, [a, b]))
        assert sorted(o.changed for o in outs) == [False, True]
        assert {o.state for o in outs} == {"reserved"}
        scope = user_scope(req["user_id"])
        assert a.charged(scope, window=a._window()) == a.filter.query_units(0.5)
        # and both settle it: charged once
        spent = PrivacyCurve.from_rho(0.001)
        barrier2 = threading.Barrier(2)

        def settle(ledger: Ledger, rid: str = req["request_id"], b2=barrier2, spent=spent):
            b2.wait()
            return ledger.settle(rid, spent=spent, outcome="ok")

        with ThreadPoolExecutor(max_workers=2) as pool:
            settled = list(pool.map(settle, [a, b]))
        assert sorted(o.changed for o in settled) == [False, True]
        assert a.charged(scope, window=a._window()) == a.filter.charge_units(spent)
    assert a.charged(dept_scope("cardiology"), window=a._window()) == a.recompute(
        dept_scope("cardiology"), window=a._window()
    )


def test_new_window_starts_at_zero_without_reading_the_old_one(url: str) -> None:
    ledger = new_ledger(url)
    yesterday = time.time() - 86_400
    ledger.reserve(inference_request(user_id="w", epsilon=9.0), now_s=yesterday)
    assert ledger.charged(user_scope("w"), window=ledger._window(yesterday)) > 0
    assert ledger.charged(user_scope("w"), window=ledger._window()) == 0


def test_a_ledger_from_before_the_running_sums_is_upgraded(url: str) -> None:
    ledger = new_ledger(url)
    kept = inference_request(user_id="u1", department="research", epsilon=1.0)
    ledger.reserve(kept)
    ledger.settle(kept["request_id"], spent=PrivacyCurve.from_rho(0.003), outcome="ok")
    forgiven = inference_request(user_id="u2", department="research", epsilon=0.5)
    ledger.reserve(forgiven)
    time.sleep(0.002)
    ledger.reset(
        {
            "adjustment_id": "old-reset",
            "action": "reset",
            "scope": "user",
            "subject": "u2",
            "reason": "",
            "actor_user_id": "admin",
        }
    )
    open_one = inference_request(user_id="u1", department="research", epsilon=0.2)
    ledger.reserve(open_one)
    window = ledger._window()
    expected = {
        s: ledger.charged(s, window=window)
        for s in (user_scope("u1"), user_scope("u2"), dept_scope("research"))
    }
    with ledger.engine.begin() as conn:  # back to the old schema
        for table, cols in (
            ("budget_accounts", ["charged_units", "epoch"]),
            ("budget_entries", ["reserved_units", "charged_units", "user_epoch", "dept_epoch"]),
        ):
            for col in cols:
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {col}"))
    ledger.engine.dispose()
    upgraded = new_ledger(url)
    for scope, units in expected.items():
        assert upgraded.charged(scope, window=window) == units
        assert upgraded.recompute(scope, window=window) == units
    assert expected[user_scope("u2")] == 0


def test_a_report_of_the_full_reservation_in_floats_is_not_an_overspend(url: str) -> None:
    ledger = new_ledger(url)
    for eps in (0.3, 1.0, 2.7, 4.4):
        req = inference_request(user_id="full", department="emergency", epsilon=eps)
        res = ledger.reserve(req)
        rho = ledger.accountant.query_curve(epsilon=eps, delta=1e-5).rho_upper()
        full = PrivacyCurve.from_rho(rho * (1 + 4e-16))  # a node's own float arithmetic
        out = ledger.settle(req["request_id"], spent=full, outcome="ok")
        assert out is not None and out.excess_rho == 0.0
        assert out.entry["charged_units"] == res.entry["reserved_units"]

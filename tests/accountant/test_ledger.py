"""The durable ledger on real Postgres (and SQLite): idempotency, exhaustion, settlement."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from fedllm.common.config import BudgetConfig
from fedllm.common.db import make_engine
from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
from fedllm.services.accountant.ledger import Ledger
from tests.kafka_helpers import inference_request


@pytest.fixture(params=["postgres", "sqlite"])
def ledger(request, fresh_database_url, tmp_path) -> Ledger:
    url = fresh_database_url if request.param == "postgres" else f"sqlite:///{tmp_path}/l.db"
    return Ledger(make_engine(url), BudgetConfig(), RdpAccountant())


def test_replayed_reservation_spends_once(ledger: Ledger) -> None:
    req = inference_request(epsilon=2.0)
    first = ledger.reserve(req)
    again = ledger.reserve(req)
    assert first.changed and first.state == "reserved"
    assert not again.changed and again.state == "reserved"
    user, _ = ledger.balances(req["user_id"], req["department"])
    one = ledger.accountant.epsilon(
        ledger.accountant.query_curve(epsilon=2.0, delta=1e-5), delta=1e-5
    )
    assert user.spent == pytest.approx(one)


def test_department_exhaustion_is_refused_with_reason(ledger: Ledger) -> None:
    first = ledger.reserve(inference_request(user_id="a", department="research", epsilon=1.5))
    second = ledger.reserve(inference_request(user_id="b", department="research", epsilon=1.5))
    assert first.state == "reserved"
    assert second.state == "rejected"
    assert "department privacy budget exhausted" in second.reason
    assert 0 < second.department.remaining < 1.5


def test_commit_charges_actual_and_refunds_rest(ledger: Ledger) -> None:
    req = inference_request(epsilon=4.0)
    ledger.reserve(req)
    actual = PrivacyCurve.from_rho(0.01)
    out = ledger.settle(req["request_id"], spent=actual, outcome="ok")
    assert out is not None and out.changed and out.state == "committed"
    assert out.user.spent == pytest.approx(actual.epsilon(delta=1e-5))
    replay = ledger.settle(req["request_id"], spent=actual, outcome="ok")
    assert replay is not None and not replay.changed
    assert replay.user.spent == pytest.approx(out.user.spent)


def test_failure_refunds_everything_once(ledger: Ledger) -> None:
    req = inference_request(epsilon=3.0)
    ledger.reserve(req)
    out = ledger.settle(req["request_id"], spent=None, outcome="failed", reason="node died")
    assert out is not None and out.state == "refunded" and out.user.spent == 0.0
    late = ledger.settle(req["request_id"], spent=PrivacyCurve.from_rho(0.1), outcome="ok")
    assert late is not None and not late.changed and late.state == "refunded"


def test_expired_reservations_are_found(ledger: Ledger) -> None:
    req = inference_request(deadline_s=-10)
    ledger.reserve(req)
    assert req["request_id"] in ledger.expired(now_ms=int(time.time() * 1000), grace_ms=0)


def test_old_window_does_not_count(ledger: Ledger) -> None:
    yesterday = time.time() - 86_400
    ledger.reserve(inference_request(user_id="w", epsilon=9.0), now_s=yesterday)
    today = ledger.reserve(inference_request(user_id="w", epsilon=9.0))
    assert today.state == "reserved"


def test_concurrent_reservations_never_overspend(fresh_database_url: str) -> None:
    ledger = Ledger(make_engine(fresh_database_url), BudgetConfig(), RdpAccountant())
    acct = ledger.accountant
    one = acct.query_curve(epsilon=1.0, delta=1e-5)
    fits = 0  # how many a sequential ledger would approve against general's 5.0
    while acct.epsilon(acct.compose(*[one] * (fits + 1)), delta=1e-5) <= 5.0:
        fits += 1
    reqs = [
        inference_request(user_id=f"u{i}", department="general", epsilon=1.0)
        for i in range(fits + 8)
    ]
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(ledger.reserve, reqs))
    approved = [o for o in outcomes if o.state == "reserved"]
    assert len(approved) == fits
    _, dept = ledger.balances("nobody", "general")
    assert dept.spent <= 5.0 + 1e-9


def adjustment(scope: str, subject: str) -> dict:
    return {
        "adjustment_id": str(uuid.uuid4()),
        "action": "reset",
        "scope": scope,
        "subject": subject,
        "reason": "approved exception",
        "actor_user_id": "admin1",
        "actor_role": "admin",
        "source_address": "127.0.0.1",
        "requested_at_ms": 0,
    }


def test_admin_reset_forgives_the_window_once(ledger: Ledger) -> None:
    first = ledger.reserve(inference_request(user_id="r1", department="research", epsilon=1.8))
    assert first.state == "reserved"
    assert (
        ledger.reserve(inference_request(user_id="r2", department="research", epsilon=1.8)).state
        == "rejected"
    )
    adj = adjustment("department", "research")
    time.sleep(0.002)
    assert ledger.reset(adj) is True
    assert ledger.reset(adj) is False  # replay
    _, dept = ledger.balances("r1", "research")
    assert dept.spent == 0.0
    user, _ = ledger.balances("r1", "research")
    assert user.spent > 0  # the user's own account is untouched by a department reset
    assert (
        ledger.reserve(inference_request(user_id="r2", department="research", epsilon=1.8)).state
        == "reserved"
    )


def test_reset_rejects_unknown_department(ledger: Ledger) -> None:
    with pytest.raises(KeyError):
        ledger.reset(adjustment("department", "astrology"))


def test_an_applied_reset_writes_its_outbox_message_in_its_own_transaction(ledger: Ledger) -> None:
    """The reset and its audit record commit together (a crash between the two cannot lose the
    record); a replay writes nothing, and a hook that fails rolls the reset back."""
    from fedllm.common import outbox
    from fedllm.common.outbox import Message

    outbox.create_table(ledger.engine)
    before = len(outbox.pending(ledger.engine))
    adj = adjustment("department", "research")
    msg = Message(topic="t", key=b"k", value=adj["adjustment_id"].encode(), headers=())
    assert ledger.reset(adj, then=lambda s: outbox.add(s, [msg])) is True
    assert ledger.reset(adj, then=lambda s: outbox.add(s, [msg])) is False  # replay
    sent = [m for _, m in outbox.pending(ledger.engine)]
    assert len(sent) == before + 1 and sent[-1].value == msg.value

    def boom(_: object) -> None:
        raise RuntimeError("hook failed")

    other = adjustment("department", "research")
    with pytest.raises(RuntimeError):
        ledger.reset(other, then=boom)
    assert ledger.reset(other) is True  # the failed attempt left no reset behind


def test_entry_row_names_every_column() -> None:
    """`Ledger.entry` returns the row as an `EntryRow`: the record type must name exactly the
    table's columns (a column added to one and not the other fails here)."""
    from fedllm.services.accountant.tables import BudgetEntry, EntryRow

    assert set(EntryRow.__required_keys__) == {c.name for c in BudgetEntry.__table__.columns}

"""The accountant's pure budget decisions (services/accountant/decide.py): no broker, no database;
the admission rule is checked against dp-accounting's zCDP conversion computed here."""

from __future__ import annotations

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant

from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant, ZcdpFilter
from fedllm.services.accountant import decide
from fedllm.services.accountant.decide import Account, Admit, Refuse

DELTA = 1e-5
F = ZcdpFilter(delta=DELTA)
ORDERS = RdpAccountant().orders


def zcdp_epsilon(rho: float) -> float:
    acct = DpRdpAccountant()
    acct.compose(dp_event.ZCDpEvent(rho))
    return acct.get_epsilon(DELTA)


def fill(epsilon: float, *, user_limit: float, dept_limit: float) -> tuple[int, Refuse]:
    """Admit queries of `epsilon` on one user and department until refused: (admitted, refusal)."""
    user = dept = 0
    for n in range(1000):
        verdict = decide.admit(
            F,
            epsilon=epsilon,
            accounts=(Account("user", user, user_limit), Account("department", dept, dept_limit)),
        )
        if isinstance(verdict, Refuse):
            return n, verdict
        user += verdict.units
        dept += verdict.units
    raise AssertionError("the filter never refused")


@pytest.mark.parametrize("epsilon,limit", [(0.3, 1.0), (0.1, 2.0), (1.0, 5.0)])
def test_admits_exactly_as_many_as_dp_accounting_allows(epsilon: float, limit: float) -> None:
    n, refusal = fill(epsilon, user_limit=limit, dept_limit=100.0)
    rho = F.rho(F.query_units(epsilon))
    assert zcdp_epsilon(rho) == pytest.approx(epsilon, rel=1e-6)  # ρ(ε) is tight, not inflated
    assert n >= 1
    assert zcdp_epsilon(n * rho) <= limit  # what was admitted composes within the limit
    assert zcdp_epsilon((n + 1) * rho) > limit  # and one more would not: refused only if needed
    assert refusal.reason.startswith("user privacy budget exhausted: requested epsilon")


def test_the_tighter_account_refuses_and_is_named() -> None:
    n_user, _ = fill(0.3, user_limit=1.0, dept_limit=100.0)
    n, refusal = fill(0.3, user_limit=100.0, dept_limit=1.0)
    assert n == n_user
    assert refusal.reason.startswith("department privacy budget exhausted")
    assert "of 1 this window" in refusal.reason


def test_admit_reserves_rho_of_epsilon_and_nothing_at_zero() -> None:
    verdict = decide.admit(F, epsilon=0.5, accounts=(Account("user", 0, 1.0),))
    assert verdict == Admit(F.query_units(0.5)) and verdict.units > 0
    assert decide.admit(F, epsilon=0.0, accounts=(Account("user", 0, 1.0),)) == Admit(0)


def test_remaining_epsilon_is_admissible_and_a_little_more_is_not() -> None:
    charged = F.query_units(0.7)
    left = decide.balance(F, charged_units=charged, limit_epsilon=1.0).remaining
    # zCDP composes sublinearly in ε: more than 1.0 - 0.7 is left, but less than the limit
    assert 0.3 < left < 1.0
    acct = (Account("user", charged, 1.0),)
    assert isinstance(decide.admit(F, epsilon=left, accounts=acct), Admit)
    assert isinstance(decide.admit(F, epsilon=left * 1.001, accounts=acct), Refuse)


def test_unknown_department_is_refused() -> None:
    assert decide.unknown_department("oncology").reason == "unknown department 'oncology'"


def test_refund_charges_nothing_and_commit_charges_the_curves_rho() -> None:
    reserved = F.query_units(1.0)
    assert decide.charge(F, reserved_units=reserved, spent=None) == decide.Charge(0, 0, "refunded")
    half = PrivacyCurve.from_rho(F.rho(reserved) / 2, orders=ORDERS)
    got = decide.charge(F, reserved_units=reserved, spent=half)
    assert got.state == "committed" and got.excess == 0
    assert got.units == F.charge_units(half) and got.units < reserved


def test_rounding_hair_is_the_reservation_and_an_overspend_is_charged_in_full() -> None:
    reserved = F.query_units(1.0)
    hair = PrivacyCurve.from_rho(F.rho(reserved) * (1 + 1e-12), orders=ORDERS)
    assert decide.charge(F, reserved_units=reserved, spent=hair).units == reserved
    double = PrivacyCurve.from_rho(F.rho(reserved) * 2, orders=ORDERS)
    got = decide.charge(F, reserved_units=reserved, spent=double)
    assert got.units == F.charge_units(double) > reserved
    assert got.excess == got.units - reserved > 0


def test_account_deltas_skip_an_account_reset_since_the_reservation() -> None:
    kw = {"new_units": 30, "old_units": 100}
    assert decide.account_deltas(entry_epochs=(0, 0), account_epochs=(0, 0), **kw) == (-70, -70)
    assert decide.account_deltas(entry_epochs=(0, 0), account_epochs=(1, 0), **kw) == (0, -70)
    assert decide.account_deltas(entry_epochs=(2, 0), account_epochs=(2, 1), **kw) == (-70, 0)


def result(**kw: object) -> dict[str, object]:
    curve = PrivacyCurve.from_rho(0.01, orders=ORDERS)
    base: dict[str, object] = {
        "request_id": "r1",
        "status": "ok",
        "reason": "",
        "node_id": "st_mary",
        "is_private": True,
        "rdp_orders": list(curve.orders),
        "rdp_epsilons": list(curve.values),
    }
    return {**base, **kw}


def test_charge_for_node_results() -> None:
    spent, status, reason = decide.charge_for(result(), orders=ORDERS)
    assert spent is not None and status == "ok" and reason == ""
    assert spent.rho_upper() == pytest.approx(0.01)
    # not DP-released: withheld, refunded
    assert decide.charge_for(result(is_private=False), orders=ORDERS)[:2] == (None, "failed")
    # a spend on orders the ledger does not use: withheld, refunded here (the caller escalates)
    other = result(rdp_orders=[2.0, 3.0], rdp_epsilons=[0.1, 0.2])
    assert decide.charge_for(other, orders=ORDERS) == (
        None,
        "failed",
        "answer withheld: privacy cost reported on unknown orders",
    )
    # a failure that reports released parts is charged; one without, refunded
    failed = result(status="failed", reason="fan-out failed")
    assert decide.charge_for(failed, orders=ORDERS)[0] == spent
    timeout = result(status="timeout", reason="late", rdp_orders=[], rdp_epsilons=[])
    assert decide.charge_for(timeout, orders=ORDERS) == (None, "timeout", "late")


def test_only_the_routers_verdict_ends_a_node_failure_without_spend() -> None:
    curve = PrivacyCurve.from_rho(0.01, orders=ORDERS)
    answer = {"kind": "answer"}
    assert not decide.ends_request(result(status="failed", **answer), None)  # router retries
    assert decide.ends_request(result(status="failed", **answer), curve)  # spent: charged now
    assert decide.ends_request(result(**answer), curve)
    verdict = result(status="failed", node_id="", kind="verdict")
    assert decide.ends_request(verdict, None)
    # The kind decides, not the node id: a verdict naming its hospital still ends the request.
    assert decide.ends_request(dict(verdict, node_id="st_mary"), None)
    assert decide.ends_request(result(node_id="a,b", kind="combined"), curve)


def test_a_part_never_ends_a_request_whatever_its_status() -> None:
    curve = PrivacyCurve.from_rho(0.01, orders=ORDERS)
    for status in ("partial", "failed", "timeout", "ok"):
        assert not decide.ends_request(result(status=status, kind="part"), curve)
        assert not decide.ends_request(result(status=status, kind="part"), None)
    assert not decide.ends_request(result(kind="final"), curve)  # not a node-results record


def test_legacy_records_are_read_as_before() -> None:
    """kind "": a node failure awaits the router, node_id "" is the verdict, "partial" a part."""
    curve = PrivacyCurve.from_rho(0.01, orders=ORDERS)
    assert not decide.ends_request(result(status="failed"), None)
    assert decide.ends_request(result(status="failed"), curve)
    assert decide.ends_request(result(status="failed", node_id=""), None)
    assert decide.ends_request(result(node_id="a,b"), curve)
    assert not decide.ends_request(result(status="partial"), curve)

"""PrivacyCurve, events and the RdpAccountant contract."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.privacy.accountant import (
    BudgetExceededError,
    ComposedEvent,
    GaussianEvent,
    LaplaceEvent,
    OrdersMismatchError,
    PrivacyCurve,
    PureDpEvent,
    RdpAccountant,
    SelfComposedEvent,
    SubsampledGaussianEvent,
    UnsupportedEventError,
    ZcdpEvent,
    window_start,
)
from fedllm.privacy.rdp import DEFAULT_ORDERS, pure_dp_rdp, rho_for_epsilon

DELTA = 1e-5
SHORT_ORDERS = (1.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


# ----------------------------------------------------------------- contract: every accountant


@pytest.fixture(params=[DEFAULT_ORDERS, SHORT_ORDERS], ids=["default-orders", "short-orders"])
def accountant(request: pytest.FixtureRequest) -> RdpAccountant:
    return RdpAccountant(orders=request.param)


def test_contract_zero_spends_nothing(accountant: RdpAccountant) -> None:
    assert accountant.epsilon(accountant.zero(), delta=DELTA) == 0.0
    assert accountant.compose() == accountant.zero()


def test_contract_query_curve_is_within_its_budget(accountant: RdpAccountant) -> None:
    for eps in (0.05, 0.5, 1.0, 4.0):
        curve = accountant.query_curve(epsilon=eps, delta=DELTA)
        assert curve.orders == accountant.orders
        assert accountant.epsilon(curve, delta=DELTA) <= eps
        assert curve.rho_upper() == pytest.approx(
            rho_for_epsilon(epsilon=eps, delta=DELTA, orders=accountant.orders), rel=1e-12
        )


def test_contract_composition_adds_up(accountant: RdpAccountant) -> None:
    a = accountant.query_curve(epsilon=1.0, delta=DELTA)
    b = accountant.curve_for(GaussianEvent(3.0))
    total = accountant.compose(a, b, b)
    np.testing.assert_allclose(total.as_array(), a.as_array() + 2 * b.as_array())
    assert total == sum([a, b, b])
    np.testing.assert_allclose((a + 2 * b).as_array(), total.as_array(), rtol=1e-15)
    assert accountant.epsilon(total, delta=DELTA) > accountant.epsilon(a, delta=DELTA)


def test_contract_would_exceed_and_check(accountant: RdpAccountant) -> None:
    q = accountant.query_curve(epsilon=1.0, delta=DELTA)
    spent = accountant.compose(q, q, q)
    assert not accountant.would_exceed(spent=spent, extra=q, limit_epsilon=10.0, delta=DELTA)
    assert accountant.would_exceed(spent=spent, extra=q, limit_epsilon=1.5, delta=DELTA)
    assert accountant.check(spent=spent, extra=q, limit_epsilon=10.0, delta=DELTA) == spent + q
    with pytest.raises(BudgetExceededError):
        accountant.check(spent=spent, extra=q, limit_epsilon=1.5, delta=DELTA)


def test_contract_remaining(accountant: RdpAccountant) -> None:
    zero = accountant.zero()
    assert accountant.remaining(spent=zero, limit_epsilon=3.0, delta=DELTA) == 3.0
    q = accountant.query_curve(epsilon=2.0, delta=DELTA)
    r = accountant.remaining(spent=q, limit_epsilon=3.0, delta=DELTA)
    assert 0 < r < 3.0  # RDP composition is sub-additive in ε: more than 1.0 is left
    assert r > 1.0
    assert accountant.remaining(spent=q, limit_epsilon=1.0, delta=DELTA) == 0.0


def test_contract_unknown_event_raises(accountant: RdpAccountant) -> None:
    class Mystery:
        pass

    assert not accountant.supports(Mystery())
    with pytest.raises(UnsupportedEventError):
        accountant.curve_for(Mystery())
    # checked before anything is computed, even deep inside a composition
    nested = ComposedEvent((GaussianEvent(1.0), SelfComposedEvent(Mystery(), 3)))  # type: ignore[arg-type]
    with pytest.raises(UnsupportedEventError):
        accountant.curve_for(nested)
    with pytest.raises(UnsupportedEventError):
        accountant.curve_for(dp_event.GaussianDpEvent(1.0))  # a foreign library's event


def test_contract_foreign_orders_rejected(accountant: RdpAccountant) -> None:
    other = PrivacyCurve.zero((2.0, 3.0))
    with pytest.raises(OrdersMismatchError):
        accountant.compose(other)
    with pytest.raises(OrdersMismatchError):
        accountant.epsilon(other, delta=DELTA)


# ----------------------------------------------------------------- events


def test_events_are_frozen_and_slotted() -> None:
    e = GaussianEvent(1.0)
    with pytest.raises(AttributeError):
        e.noise_multiplier = 2.0  # type: ignore[misc]
    assert not hasattr(e, "__dict__")
    assert ComposedEvent([e, e]).events == (e, e)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SelfComposedEvent(e, -1)


def test_event_curves() -> None:
    acc = RdpAccountant()
    o = np.array(DEFAULT_ORDERS)
    np.testing.assert_allclose(acc.curve_for(ZcdpEvent(0.25)).as_array(), 0.25 * o)
    np.testing.assert_allclose(
        acc.curve_for(PureDpEvent(0.3)).as_array(), pure_dp_rdp(orders=o, epsilon=0.3)
    )
    assert acc.curve_for(SelfComposedEvent(GaussianEvent(0.0), 0)) == acc.zero()
    ref = DpRdpAccountant()
    ref.compose(
        dp_event.ComposedDpEvent(
            [
                dp_event.LaplaceDpEvent(1.5),
                dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(2.0)),
            ]
        ),
        3,
    )
    ours = acc.curve_for(
        SelfComposedEvent(ComposedEvent((LaplaceEvent(1.5), SubsampledGaussianEvent(0.05, 2.0))), 3)
    )
    np.testing.assert_allclose(ours.as_array(), ref.rdp, rtol=1e-6)
    assert ours.epsilon(delta=DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-6)


# ----------------------------------------------------------------- PrivacyCurve


def test_curve_validation_and_dict() -> None:
    c = PrivacyCurve.from_rho(0.1, orders=SHORT_ORDERS)
    assert c.to_dict() == {"orders": list(SHORT_ORDERS), "values": [0.1 * a for a in SHORT_ORDERS]}
    assert PrivacyCurve.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert PrivacyCurve.from_dict({**c.to_dict(), "future_field": 1}) == c
    for bad in (
        {"orders": [2.0]},
        {"values": [1.0]},
        {"orders": [2.0, 3.0], "values": [1.0]},
        {"orders": [0.5], "values": [1.0]},
        {"orders": [2.0], "values": [-1.0]},
        {"orders": [2.0], "values": [math.nan]},
        {"orders": "2", "values": "1"},
        {"orders": [2.0], "values": ["1"]},
        {"orders": [], "values": []},
        [("orders", [2.0])],
    ):
        with pytest.raises(ValueError):
            PrivacyCurve.from_dict(bad)  # type: ignore[arg-type]


def test_curve_dominates_and_rho_upper() -> None:
    small = PrivacyCurve.from_rho(0.1, orders=SHORT_ORDERS)
    big = PrivacyCurve.from_rho(0.2, orders=SHORT_ORDERS)
    assert big.dominates(small) and big.dominates(big) and not small.dominates(big)
    assert big.rho_upper() == pytest.approx(0.2)
    mixed = PrivacyCurve(SHORT_ORDERS, pure_dp_rdp(orders=SHORT_ORDERS, epsilon=0.5))
    assert mixed.rho_upper() == pytest.approx(0.125)
    assert PrivacyCurve.from_rho(mixed.rho_upper(), orders=SHORT_ORDERS).dominates(mixed)
    with pytest.raises(OrdersMismatchError):
        big.dominates(PrivacyCurve.zero((2.0,)))
    with pytest.raises(OrdersMismatchError):
        _ = big + PrivacyCurve.zero((2.0,))
    assert 3 * small == small + small + small
    assert 0 * PrivacyCurve((2.0,), (math.inf,)) == PrivacyCurve.zero((2.0,))


curve_values = st.lists(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False) | st.just(math.inf),
    min_size=len(SHORT_ORDERS),
    max_size=len(SHORT_ORDERS),
)


@settings(max_examples=200, deadline=None)
@given(values=curve_values)
def test_curve_dict_round_trip(values: list[float]) -> None:
    c = PrivacyCurve(SHORT_ORDERS, tuple(values))
    assert PrivacyCurve.from_dict(c.to_dict()) == c
    assert PrivacyCurve.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@settings(max_examples=60, deadline=None)
@given(
    spent_eps=st.lists(st.floats(min_value=0.01, max_value=3.0), max_size=5),
    limit=st.floats(min_value=0.05, max_value=20.0),
    delta=st.sampled_from([1e-3, 1e-5, 1e-8]),
)
def test_remaining_consistent_with_would_exceed(
    spent_eps: list[float], limit: float, delta: float
) -> None:
    acc = RdpAccountant()
    spent = acc.compose(*(acc.query_curve(epsilon=e, delta=delta) for e in spent_eps))
    r = acc.remaining(spent=spent, limit_epsilon=limit, delta=delta)
    assert 0.0 <= r <= limit
    if acc.epsilon(spent, delta=delta) > limit:
        assert r == 0.0
        return
    assert not acc.would_exceed(
        spent=spent, extra=acc.query_curve(epsilon=r, delta=delta), limit_epsilon=limit, delta=delta
    )
    if r < limit:  # and a little more does not fit (or buys no more ρ: flat KL region)
        more = r * (1 + 1e-6) + 1e-9
        extra = acc.query_curve(epsilon=more, delta=delta)
        assert acc.would_exceed(
            spent=spent, extra=extra, limit_epsilon=limit, delta=delta
        ) or extra == acc.query_curve(epsilon=r, delta=delta)


# ----------------------------------------------------------------- budget windows


def test_window_start() -> None:
    day = 86_400
    assert window_start(now_s=0, window_seconds=day) == 0
    assert window_start(now_s=1_700_000_000.9, window_seconds=day) == 1_699_920_000
    assert window_start(now_s=1_699_920_000, window_seconds=day) == 1_699_920_000
    assert window_start(now_s=1_699_919_999.999, window_seconds=day) == 1_699_833_600
    assert window_start(now_s=-1, window_seconds=day) == -day
    assert window_start(now_s=125, window_seconds=60) == 120
    with pytest.raises(ValueError):
        window_start(now_s=1.0, window_seconds=0)
    with pytest.raises(TypeError):
        window_start(now_s=1.0, window_seconds=1.5)  # type: ignore[arg-type]

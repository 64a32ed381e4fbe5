"""The zCDP filter's admission rule and conversions, against dp-accounting computed here."""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.privacy.accountant import (
    RHO_UNITS_PER_RHO,
    GaussianEvent,
    LaplaceEvent,
    PureDpEvent,
    RdpAccountant,
    ZcdpFilter,
)


def dp_epsilon(*events: dp_event.DpEvent, delta: float) -> float:
    acct = DpRdpAccountant()
    acct.compose(dp_event.ComposedDpEvent(list(events)))
    return acct.get_epsilon(delta)


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
@pytest.mark.parametrize("limit", [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0])
def test_limit_rho_is_the_largest_that_meets_epsilon(limit: float, delta: float) -> None:
    f = ZcdpFilter(delta=delta)
    rho = f.limit_units(limit) / RHO_UNITS_PER_RHO
    assert dp_epsilon(dp_event.ZCDpEvent(rho), delta=delta) <= limit
    assert dp_epsilon(dp_event.ZCDpEvent(rho * (1 + 1e-9)), delta=delta) > limit  # tight
    # the same through a Gaussian with exactly that ρ = 1/(2σ²)
    sigma = 1 / math.sqrt(2 * rho * (1 - 1e-12))
    assert dp_epsilon(dp_event.GaussianDpEvent(sigma), delta=delta) <= limit


def test_admitted_gaussians_compose_within_the_limit() -> None:
    """Fill an account with Gaussian releases the filter admits; dp-accounting's ε of their
    composition stays under the account's ε, and the next one is refused only when needed."""
    f, acct = ZcdpFilter(delta=1e-5), RdpAccountant()
    sigmas = [3.0, 5.0, 2.5, 8.0, 4.0, 3.5, 6.0, 2.0, 7.0, 3.0, 2.2, 9.0]
    charged, admitted = 0, []
    for sigma in sigmas:
        units = f.charge_units(acct.curve_for(GaussianEvent(sigma)))
        assert units == f.units_up(1 / (2 * sigma**2))  # Gaussian: exact ρ
        if f.admits(charged=charged, extra=units, limit_epsilon=2.0):
            charged += units
            admitted.append(sigma)
    assert 3 <= len(admitted) < len(sigmas)
    eps = dp_epsilon(*(dp_event.GaussianDpEvent(s) for s in admitted), delta=1e-5)
    assert eps <= 2.0
    assert f.epsilon(charged) == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize("event", [PureDpEvent(0.5), PureDpEvent(1.5), LaplaceEvent(2.0)])
def test_other_curves_are_charged_a_dominating_rho(event: object) -> None:
    acct, f = RdpAccountant(), ZcdpFilter(delta=1e-5)
    curve = acct.curve_for(event)
    rho = f.charge_units(curve) / RHO_UNITS_PER_RHO
    assert all(rho * a >= v for a, v in zip(curve.orders, curve.values, strict=True))
    assert rho == pytest.approx(curve.rho_upper(), rel=1e-12)  # the tightest on the grid
    if isinstance(event, PureDpEvent):
        assert rho == pytest.approx(event.epsilon**2 / 2, rel=1e-12)  # ε-DP ⇒ ε²/2-zCDP


@settings(max_examples=60, deadline=None)
@given(limit=st.floats(0.01, 30), used=st.floats(0, 1))
def test_remaining_is_what_a_query_may_still_reserve(limit: float, used: float) -> None:
    f = ZcdpFilter(delta=1e-5)
    # units above 2**53: the float product can round past the limit, so clamp it
    charged = min(f.limit_units(limit), int(f.limit_units(limit) * used))
    left = f.remaining_epsilon(charged=charged, limit_epsilon=limit)
    assert 0 <= left <= limit
    assert f.admits(charged=charged, extra=f.query_units(left), limit_epsilon=limit)
    if 0 < left < limit:
        bigger = left * (1 + 1e-9)
        assert not f.admits(charged=charged, extra=f.query_units(bigger), limit_epsilon=limit)


def test_units_round_conservatively() -> None:
    f = ZcdpFilter(delta=1e-5)
    assert f.units_up(0.1) == 10**14 + 1  # 0.1 as a double is slightly above 1/10
    assert f.units_down(0.1) == 10**14
    assert f.query_units(0.0) == 0 and f.limit_units(0.0) == 0
    with pytest.raises(ValueError):
        f.units_up(float("nan"))


def test_fast_zcdp_conversion_equals_the_general_one_bit_for_bit() -> None:
    """The filter's ε of Σρ (order-only terms precomputed) is exactly eps_from_rdp of ρ·α."""
    import numpy as np

    from fedllm.privacy.accountant import _eps_of_rho
    from fedllm.privacy.rdp import eps_from_rdp, zcdp_rdp

    orders = ZcdpFilter(delta=1e-5).orders
    rng = np.random.default_rng(7)
    rhos = [0.0, 1e-30, 1e-12] + list(10 ** rng.uniform(-16, 3, 500))
    for delta in (1e-5, 1e-9, 0.25):
        for rho in rhos:
            general = eps_from_rdp(orders=orders, rdp=zcdp_rdp(orders=orders, rho=rho), delta=delta)
            assert _eps_of_rho.__wrapped__(float(rho), delta, orders) == general[0]

"""The one calibration helper: it reproduces the loops it replaced bit for bit, and never
overshoots the budget it is given."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.calibration import calibrate_parts, part_sigmas, sigma_for_rho, spent_rho
from fedllm.privacy.mechanisms import GaussianMechanism
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.aggregate import _calibrate

# ------------------------------------------------------------- the loops as they were (reference)


def _old_aggregate(
    *, rho: float, epsilon: float, delta: float, parts: Sequence[tuple[float, float]]
) -> tuple[list[float], PrivacyCurve]:
    sigmas = [math.sqrt(d2 / (2 * rho * share)) for d2, share in parts]
    while True:
        spent = sum(d2 / (2 * s * s) for (d2, _), s in zip(parts, sigmas, strict=True))
        curve = PrivacyCurve.from_rho(spent)
        if spent <= rho and curve.rho_upper() <= rho and curve.epsilon(delta=delta) <= epsilon:
            return sigmas, curve
        sigmas = [s * (1 + 1e-12) for s in sigmas]


def _old_entity(*, d2: int, rho: float) -> tuple[float, float]:
    sigma = math.sqrt(d2 / (2 * rho))
    while d2 / (2 * sigma * sigma) > rho:
        sigma *= 1 + 1e-12
    return sigma, d2 / (2 * sigma * sigma)


def _old_gaussian(*, epsilon: float, delta: float, sensitivity: float) -> float:
    rho = rho_for_epsilon(epsilon=epsilon, delta=delta)
    sigma = sensitivity / math.sqrt(2 * rho)
    while GaussianMechanism(sigma, sensitivity).epsilon(delta=delta) > epsilon:
        sigma = math.nextafter(sigma, math.inf)
    return sigma


EPSILONS = (0.05, 0.3, 1.0, 2.5, 8.0)
DELTAS = (1e-8, 1e-5, 1e-3)
PART_SETS = (
    [(1.0, 1.0)],
    [(49.0, 1.0)],
    [(8.0, 1.0)],
    [(100.0, 0.75), (1.0, 0.25)],
    [(2.0, 0.5), (3.0, 0.3), (5.0, 0.2)],
)


@pytest.mark.parametrize(("epsilon", "delta"), itertools.product(EPSILONS, DELTAS))
def test_aggregate_calibration_matches_the_old_loop(epsilon: float, delta: float) -> None:
    full = rho_for_epsilon(epsilon=epsilon, delta=delta)
    for rho in (full, full / 3):
        eps = epsilon if rho == full else PrivacyCurve.from_rho(rho).epsilon(delta=delta)
        for parts in PART_SETS:
            new = _calibrate(rho=rho, epsilon=eps, delta=delta, parts=parts)
            assert new == _old_aggregate(rho=rho, epsilon=eps, delta=delta, parts=parts)


@pytest.mark.parametrize("rho", [1e-4, 0.013, 0.1, 0.5, 1.0, 3.7, 40.0])
def test_entity_calibration_matches_the_old_loop(rho: float) -> None:
    for d2 in (2, 6, 10, 64):
        sigmas, spent = calibrate_parts(rho=rho, parts=[(d2, 1.0)])
        assert (sigmas[0], spent) == _old_entity(d2=d2, rho=rho)


@pytest.mark.parametrize(("epsilon", "delta"), itertools.product(EPSILONS, DELTAS))
def test_gaussian_mechanism_calibration_matches_the_old_loop(epsilon: float, delta: float) -> None:
    for sensitivity in (0.01, 1.0, 3.0, 250.0):
        mech = GaussianMechanism.calibrate(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
        assert mech.sigma == _old_gaussian(epsilon=epsilon, delta=delta, sensitivity=sensitivity)


_parts = st.lists(
    st.tuples(st.floats(min_value=1e-3, max_value=1e4), st.floats(min_value=0.05, max_value=1.0)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(rho=st.floats(min_value=1e-6, max_value=100.0), parts=_parts)
def test_calibrated_sigma_never_overshoots(rho: float, parts: list[tuple[float, float]]) -> None:
    total = sum(w for _, w in parts)
    parts = [(d2, w / total) for d2, w in parts]  # shares of one budget
    sigmas, spent = calibrate_parts(rho=rho, parts=parts)
    assert spent == spent_rho(parts=parts, sigmas=sigmas) <= rho
    # and not wastefully large: each σ within a relative 1e-9 of the exact-arithmetic one
    for s, exact in zip(sigmas, part_sigmas(rho=rho, parts=parts), strict=True):
        assert exact <= s <= exact * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(
    epsilon=st.floats(min_value=0.01, max_value=20.0),
    delta=st.floats(min_value=1e-10, max_value=1e-3),
)
def test_calibrated_count_never_overshoots_epsilon(epsilon: float, delta: float) -> None:
    rho = rho_for_epsilon(epsilon=epsilon, delta=delta)
    (sigma,), curve = _calibrate(rho=rho, epsilon=epsilon, delta=delta, parts=[(1.0, 1.0)])
    assert curve.epsilon(delta=delta) <= epsilon
    ref = DpRdpAccountant()  # independent: dp-accounting on the same noise multiplier
    ref.compose(dp_event.GaussianDpEvent(sigma))
    assert ref.get_epsilon(delta) <= epsilon * (1 + 1e-9)


def test_sigma_for_rho_and_refusals() -> None:
    assert sigma_for_rho(rho=0.5, sensitivity=3.0) == 3.0
    assert spent_rho(parts=[(9.0, 1.0)], sigmas=[3.0]) == 0.5
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            sigma_for_rho(rho=bad)
        with pytest.raises(ValueError):
            calibrate_parts(rho=bad, parts=[(1.0, 1.0)])
    with pytest.raises(ValueError):
        calibrate_parts(rho=1.0, parts=[(0.0, 1.0)])

"""Mechanisms: calibration never overshoots, exact samplers have the right law."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant as DpRdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.privacy.mechanisms import (
    DiscreteGaussianMechanism,
    ExponentialMechanism,
    GaussianMechanism,
    LaplaceMechanism,
    grid_sensitivity,
    noisy_count,
    release_on_grid,
    sample_bernoulli_exp,
    sample_discrete_gaussian,
    sample_discrete_laplace,
)
from fedllm.privacy.rdp import DEFAULT_ORDERS, eps_from_rdp, laplace_rdp, pure_dp_rdp


@settings(max_examples=150, deadline=None)
@given(
    epsilon=st.floats(min_value=0.01, max_value=50.0),
    delta=st.floats(min_value=1e-12, max_value=1e-2),
    sensitivity=st.floats(min_value=1e-3, max_value=1e3),
)
def test_calibrated_sigma_never_overshoots(
    epsilon: float, delta: float, sensitivity: float
) -> None:
    mech = GaussianMechanism.calibrate(epsilon=epsilon, delta=delta, sensitivity=sensitivity)
    assert mech.epsilon(delta=delta) <= epsilon
    # independent check with dp-accounting on the same noise multiplier
    ref = DpRdpAccountant()
    ref.compose(dp_event.GaussianDpEvent(mech.sigma / sensitivity))
    assert ref.get_epsilon(delta) <= epsilon * (1 + 1e-9)
    # and it is not wastefully large: 0.01% less noise overshoots (unless in the flat KL region)
    smaller = GaussianMechanism(mech.sigma * (1 - 1e-4), sensitivity)
    assert smaller.epsilon(delta=delta) > epsilon or smaller.epsilon(delta=delta) == 0.0


def test_gaussian_mechanism_properties() -> None:
    mech = GaussianMechanism(sigma=2.0, sensitivity=3.0)
    assert mech.rho == pytest.approx(9 / 8)
    np.testing.assert_allclose(mech.rdp(DEFAULT_ORDERS), np.array(DEFAULT_ORDERS) * 9 / 8)
    with pytest.raises(ValueError):
        GaussianMechanism(sigma=0.0)
    with pytest.raises(AttributeError):
        mech.sigma = 1.0  # type: ignore[misc]


def test_discrete_gaussian_mechanism_calibration() -> None:
    mech = DiscreteGaussianMechanism.calibrate(epsilon=1.0, delta=1e-5, sensitivity=2)
    assert mech.epsilon(delta=1e-5) <= 1.0
    assert mech.rho == pytest.approx(4 / (2 * mech.sigma**2))
    with pytest.raises(TypeError):
        DiscreteGaussianMechanism(sigma=1.0, sensitivity=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0])
def test_laplace_calibration(epsilon: float) -> None:
    mech = LaplaceMechanism.calibrate(epsilon=epsilon, sensitivity=2.0)
    assert mech.pure_epsilon <= epsilon
    assert mech.scale == pytest.approx(2.0 / epsilon)
    np.testing.assert_allclose(
        mech.rdp([1.5, 4.0]), laplace_rdp(orders=[1.5, 4.0], scale=mech.scale, sensitivity=2.0)
    )


def test_exponential_mechanism_gumbel_max_matches_softmax() -> None:
    mech = ExponentialMechanism(epsilon=2.0, sensitivity=1.0)
    scores = [0.0, 1.0, 2.0, 0.5]
    p = mech.probabilities(scores)
    for rng in (np.random.default_rng(7), random.Random(7)):
        n = 10_000
        counts = np.bincount([mech.select(scores, rng) for _ in range(n)], minlength=4)
        # 5 standard errors, per cell
        assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n))
    np.testing.assert_allclose(mech.rdp([2.0]), pure_dp_rdp(orders=[2.0], epsilon=2.0))
    with pytest.raises(ValueError):
        mech.select([], np.random.default_rng(0))


def discrete_gaussian_moments(sigma: float) -> tuple[float, float]:
    y = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41)
    w = np.exp(-(y.astype(float) ** 2) / (2 * sigma**2))
    w /= w.sum()
    return float((w * y).sum()), float((w * y**2).sum())


@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.7, 25.0])
def test_discrete_gaussian_moments(sigma: float) -> None:
    n = 10_000
    x = sample_discrete_gaussian(sigma=sigma, size=n, rng=random.Random(1234))
    assert x.dtype == np.int64 and x.shape == (n,)
    _, var = discrete_gaussian_moments(sigma)
    assert var < sigma**2 + 1e-12  # CKS20: variance below σ²
    assert abs(x.mean()) <= 5 * math.sqrt(var / n)
    # Var of the sample variance ≈ (μ4 − σ⁴)/n ≤ 2σ⁴/n·(1+small); allow 6 standard errors
    assert abs(x.var() - var) <= 6 * math.sqrt(2 * var**2 / n) + 1e-9


@pytest.mark.parametrize("scale", [0.5, 2.0, Fraction(7, 3)])
def test_discrete_laplace_moments(scale: float | Fraction) -> None:
    n = 20_000
    x = sample_discrete_laplace(scale=scale, size=n, rng=random.Random(99))
    assert x.dtype == np.int64
    e = math.exp(-1 / float(scale))
    var = 2 * e / (1 - e) ** 2
    assert abs(x.mean()) <= 5 * math.sqrt(var / n)
    # heavy-ish tails: kurtosis ~ 6, so Var(sample var) ≈ 5·var²/n
    assert abs(x.var() - var) <= 6 * math.sqrt(5 * var**2 / n)
    # the law itself: P[0] = tanh(1/(2s))
    p0 = math.tanh(1 / (2 * float(scale)))
    assert abs(np.mean(x == 0) - p0) <= 5 * math.sqrt(p0 * (1 - p0) / n)


def test_samplers_accept_numpy_generator_and_are_reproducible() -> None:
    a = sample_discrete_gaussian(sigma=2.5, size=200, rng=np.random.default_rng(5))
    b = sample_discrete_gaussian(sigma=2.5, size=200, rng=np.random.default_rng(5))
    assert (a == b).all()
    c = sample_discrete_laplace(scale=1.5, size=200, rng=random.Random(5))
    d = sample_discrete_laplace(scale=1.5, size=200, rng=random.Random(5))
    assert (c == d).all()
    assert sample_discrete_gaussian(sigma=1.0, size=5, rng=random.SystemRandom()).shape == (5,)


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(5, 2)])
def test_bernoulli_exp(gamma: Fraction) -> None:
    rng = random.Random(3)
    n = 20_000
    p = math.exp(-float(gamma))
    hits = sum(sample_bernoulli_exp(gamma=gamma, rng=rng) for _ in range(n))
    assert abs(hits / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_noisy_count_is_an_int_and_validates() -> None:
    out = noisy_count(value=10, sigma=2.0, rng=random.Random(0))
    assert isinstance(out, int)
    with pytest.raises(TypeError):
        noisy_count(value=1.5, sigma=2.0, rng=random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        noisy_count(value=1, sigma=0.0, rng=random.Random(0))


def test_release_on_grid() -> None:
    rng = random.Random(11)
    g = 100
    outs = np.array(
        [
            release_on_grid(value=0.123456, sensitivity=0.5, sigma=0.05, granularity=g, rng=rng)
            for _ in range(4000)
        ]
    )
    k = np.rint(outs * g)
    assert np.allclose(outs * g, k, atol=1e-6)  # on the grid
    assert abs(outs.mean() - 0.12) <= 5 * 0.05 / math.sqrt(4000)
    assert grid_sensitivity(sensitivity=0.5, granularity=g) == 50
    assert grid_sensitivity(sensitivity=0.1, granularity=10) == 2  # 0.1 as a double is > 1/10
    assert grid_sensitivity(sensitivity=Fraction(1, 10), granularity=10) == 1
    mech = DiscreteGaussianMechanism(sigma=0.05 * g, sensitivity=50)
    assert eps_from_rdp(orders=DEFAULT_ORDERS, rdp=mech.rdp(), delta=1e-5)[0] > 0

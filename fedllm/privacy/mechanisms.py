"""Noise mechanisms as frozen value objects, and float-safe exact samplers.

Each mechanism states its maths and exposes ``.rdp(orders)``; calibration classmethods pick the
noise for a target guarantee and never overshoot it (the result is re-checked by the same
RDP → (ε, δ) conversion the accountant uses).

Floating-point noise is attackable: Mironov (2012, "On significance of the least significant
bits for differential privacy") recovers the input from the low bits of ``x + Laplace()`` computed
in doubles (the "snapping" mechanism is his remedy). fedllm releases counts and grid-rounded
values with **integer** noise drawn exactly by the Canonne–Kamath–Steinke (2020, "The Discrete
Gaussian for Differential Privacy") samplers below, which use only integer arithmetic on exact
rationals, so no floating-point artefact depends on the private data.

Randomness (``rng``): a ``random.Random`` instance — use ``random.SystemRandom()`` in services
(OS CSPRNG); a seeded ``random.Random(seed)`` (Mersenne Twister, not cryptographic) is for tests
only — or a ``numpy.random.Generator`` (reproducible, also not cryptographic). Only uniform
integers ``randbelow(n)`` are drawn from it, so the samplers are exact given an ideal source.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedllm.privacy.calibration import sigma_for_rho, widen
from fedllm.privacy.rdp import (
    DEFAULT_ORDERS,
    eps_from_rdp,
    gaussian_rdp,
    laplace_rdp,
    pure_dp_rdp,
    rho_for_epsilon,
)

__all__ = [
    "DiscreteGaussianMechanism",
    "ExponentialMechanism",
    "GaussianMechanism",
    "LaplaceMechanism",
    "Rng",
    "grid_sensitivity",
    "noisy_count",
    "release_on_grid",
    "sample_bernoulli_exp",
    "sample_discrete_gaussian",
    "sample_discrete_laplace",
]

Rng = random.Random | np.random.Generator
Orders = Sequence[float] | np.ndarray
Real = float | int | Fraction


# --------------------------------------------------------------------------- exact samplers


def _randbelow(rng: Rng, n: int) -> int:
    """Uniform integer in [0, n), exact for any n ≥ 1."""
    if isinstance(rng, np.random.Generator):
        if n <= 2**62:
            return int(rng.integers(0, n))
        nbits = n.bit_length()
        nbytes = (nbits + 7) // 8
        mask = (1 << nbits) - 1
        while True:  # rejection sampling on nbits uniform bits
            r = int.from_bytes(rng.bytes(nbytes), "little") & mask
            if r < n:
                return r
    return rng.randrange(n)


def _bernoulli(rng: Rng, num: int, den: int) -> bool:
    """Bernoulli(num/den), 0 ≤ num ≤ den."""
    return _randbelow(rng, den) < num


def _bernoulli_exp_le1(rng: Rng, num: int, den: int) -> bool:
    """Bernoulli(exp(−γ)) for γ = num/den ∈ [0, 1] (CKS20 Alg. 1, first part)."""
    k = 1
    while _bernoulli(rng, num, den * k):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(rng: Rng, num: int, den: int) -> bool:
    """Bernoulli(exp(−num/den)) for num/den ≥ 0 (CKS20 Alg. 1)."""
    whole = num // den
    for _ in range(whole):
        if not _bernoulli_exp_le1(rng, 1, 1):
            return False
    return _bernoulli_exp_le1(rng, num - whole * den, den)


def _as_fraction(x: Real, name: str) -> Fraction:
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{name} must be finite; got {x}")
    f = Fraction(x)
    if f <= 0:
        raise ValueError(f"{name} must be > 0; got {x}")
    return f


def sample_bernoulli_exp(*, gamma: Real, rng: Rng) -> bool:
    """One exact draw of Bernoulli(exp(−γ)), γ ≥ 0 rational (CKS20 Algorithm 1)."""
    g = Fraction(gamma)
    if g < 0:
        raise ValueError(f"gamma must be >= 0; got {gamma}")
    return _bernoulli_exp(rng, g.numerator, g.denominator)


def _geometric_exp(rng: Rng, num: int, den: int) -> int:
    """V ≥ 0 with P[V = v] ∝ exp(−v·num/den): count successes of Bernoulli(exp(−num/den))."""
    v = 0
    while _bernoulli_exp(rng, num, den):
        v += 1
    return v


def _discrete_laplace_one(rng: Rng, s: Fraction) -> int:
    """Y with P[Y = y] ∝ exp(−|y|/s), s = n/d > 0 (CKS20 Algorithm 2)."""
    n, d = s.numerator, s.denominator
    while True:
        u = _randbelow(rng, n)
        if not _bernoulli_exp(rng, u, n):
            continue
        v = _geometric_exp(rng, 1, 1)
        y = (u + n * v) // d
        negative = _bernoulli(rng, 1, 2)
        if negative and y == 0:
            continue
        return -y if negative else y


def _discrete_gaussian_one(rng: Rng, sigma: Fraction) -> int:
    """Y with P[Y = y] ∝ exp(−y²/(2σ²)) (CKS20 Algorithm 3: rejection from DLap(t), t=⌊σ⌋+1)."""
    t = math.floor(sigma) + 1
    s2 = sigma * sigma
    sn, sd = s2.numerator, s2.denominator  # σ² = sn/sd
    while True:
        y = _discrete_laplace_one(rng, Fraction(t))
        # Accept with prob exp(−(|y| − σ²/t)² / (2σ²)), as one exact rational γ = num/den:
        # (|y| − sn/(sd·t))² / (2·sn/sd) = (|y|·sd·t − sn)² / (2·sn·sd·t²).
        num = (abs(y) * sd * t - sn) ** 2
        den = 2 * sn * sd * t * t
        if _bernoulli_exp(rng, num, den):
            return y


def sample_discrete_laplace(*, scale: Real, size: int, rng: Rng) -> np.ndarray:
    """``size`` exact draws of the discrete Laplace P[y] ∝ exp(−|y|/scale) on ℤ, as int64.

    Canonne–Kamath–Steinke 2020, Algorithm 2; ``scale`` is converted exactly to a rational
    (a float is its exact binary value). Mean 0, variance 2e^{−1/s}/(1−e^{−1/s})².
    """
    s = _as_fraction(scale, "scale")
    return np.array([_discrete_laplace_one(rng, s) for _ in range(size)], dtype=np.int64)


def sample_discrete_gaussian(*, sigma: Real, size: int, rng: Rng) -> np.ndarray:
    """``size`` exact draws of the discrete Gaussian N_ℤ(0, σ²), P[y] ∝ exp(−y²/(2σ²)), int64.

    Canonne–Kamath–Steinke 2020, Algorithm 3 (integer arithmetic only; σ taken exactly as a
    rational). Mean 0, variance slightly below σ² (CKS20 Prop. 19).
    """
    s = _as_fraction(sigma, "sigma")
    return np.array([_discrete_gaussian_one(rng, s) for _ in range(size)], dtype=np.int64)


def noisy_count(*, value: int, sigma: Real, rng: Rng) -> int:
    """Release an integer count (sensitivity 1 under add/remove-one-patient when each patient
    contributes at most one record to it) as ``value + N_ℤ(0, σ²)``.

    Guarantee: (1/(2σ²))-zCDP, i.e. RDP α/(2σ²) (CKS20 Thm 14) — the same curve as
    ``DiscreteGaussianMechanism(sigma=σ, sensitivity=1).rdp``.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"value must be an int; got {type(value).__name__}")
    return int(value) + _discrete_gaussian_one(rng, _as_fraction(sigma, "sigma"))


def grid_sensitivity(*, sensitivity: Real, granularity: int) -> int:
    """Integer sensitivity after rounding to the grid (1/g)ℤ: ⌈g·Δ⌉, computed exactly.

    Rounding half-to-even is monotone and commutes with integer shifts, so two inputs at
    distance ≤ Δ round to grid points at most ⌈g·Δ⌉ steps apart.
    """
    if not (isinstance(granularity, int) and granularity >= 1):
        raise ValueError(f"granularity must be a positive int; got {granularity}")
    d = Fraction(sensitivity)
    if d < 0:
        raise ValueError(f"sensitivity must be >= 0; got {sensitivity}")
    return math.ceil(d * granularity)


def release_on_grid(
    *, value: float, sensitivity: Real, sigma: Real, granularity: int, rng: Rng
) -> float:
    """Release a real value with discrete Gaussian noise on the grid (1/g)ℤ.

    Remedy used: **discretisation** (Canonne–Kamath–Steinke 2020), not snapping (Mironov 2012):
    k = round(g·value) is computed exactly from the float's rational value, k + N_ℤ(0, (g·σ)²)
    is drawn with integer arithmetic, and the float returned, (k + noise)/g, is post-processing
    of that integer — its low bits carry nothing about the input.

    Guarantee: RDP α·Δ_g²/(2·(g·σ)²) with Δ_g = ⌈g·Δ⌉ (:func:`grid_sensitivity`), i.e.
    ``DiscreteGaussianMechanism(sigma=g·σ, sensitivity=Δ_g).rdp``; equal to the continuous
    Gaussian's α·Δ²/(2σ²) when g·Δ is an integer. The output has granularity 1/g.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"value must be finite; got {value}")
    grid_sensitivity(sensitivity=sensitivity, granularity=granularity)  # validates
    k = round(Fraction(value) * granularity)  # exact, half-to-even
    noise = _discrete_gaussian_one(rng, _as_fraction(sigma, "sigma") * granularity)
    return (k + noise) / granularity


# --------------------------------------------------------------------------- mechanisms


def _check_positive(name: str, x: float) -> None:
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0; got {x}")


@dataclass(frozen=True, slots=True)
class GaussianMechanism:
    """f(D) + N(0, σ²) per coordinate, f of L2 sensitivity Δ.

    RDP ε_α = α·Δ²/(2σ²), i.e. ρ-zCDP with ρ = Δ²/(2σ²) (Mironov 2017 Prop. 7; Bun–Steinke
    2016). Analysis object: to release with floats-safe noise use the discrete Gaussian
    (:class:`DiscreteGaussianMechanism`, :func:`release_on_grid`), which has the same curve.
    """

    sigma: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("sigma", self.sigma)
        _check_positive("sensitivity", self.sensitivity)

    @property
    def noise_multiplier(self) -> float:
        """σ/Δ."""
        return self.sigma / self.sensitivity

    @property
    def rho(self) -> float:
        """zCDP parameter Δ²/(2σ²)."""
        return self.sensitivity**2 / (2 * self.sigma**2)

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> np.ndarray:
        return gaussian_rdp(
            orders=orders, noise_multiplier=self.sigma, sensitivity=self.sensitivity
        )

    def epsilon(self, *, delta: float, orders: Orders = DEFAULT_ORDERS) -> float:
        return eps_from_rdp(orders=orders, rdp=self.rdp(orders), delta=delta)[0]

    @classmethod
    def calibrate(
        cls,
        *,
        epsilon: float,
        delta: float,
        sensitivity: float = 1.0,
        orders: Orders = DEFAULT_ORDERS,
    ) -> GaussianMechanism:
        """Smallest σ (to rounding) whose RDP curve converts to ≤ ε at δ; never overshoots."""
        _check_positive("epsilon", epsilon)
        _check_positive("sensitivity", sensitivity)
        rho = rho_for_epsilon(epsilon=epsilon, delta=delta, orders=orders)
        if rho <= 0:
            raise ValueError(f"no Gaussian mechanism achieves epsilon={epsilon} at delta={delta}")
        (sigma,) = widen(
            [sigma_for_rho(rho=rho, sensitivity=sensitivity)],
            fits=lambda s: cls(s[0], sensitivity).epsilon(delta=delta, orders=orders) <= epsilon,
            step=None,  # one float at a time
        )
        return cls(sigma, sensitivity)


@dataclass(frozen=True, slots=True)
class DiscreteGaussianMechanism:
    """f(D) + N_ℤ(0, σ²) on an integer-valued f of integer L2 sensitivity Δ.

    RDP ε_α = α·Δ²/(2σ²), the same as the continuous Gaussian (CKS20 Thm 14/15: ρ = Δ²/(2σ²)
    zCDP for integer Δ). Drawn exactly by :func:`sample_discrete_gaussian`.
    """

    sigma: float
    sensitivity: int = 1

    def __post_init__(self) -> None:
        _check_positive("sigma", self.sigma)
        if isinstance(self.sensitivity, bool) or not isinstance(self.sensitivity, int):
            raise TypeError("sensitivity of a discrete mechanism must be an int")
        if self.sensitivity < 1:
            raise ValueError(f"sensitivity must be >= 1; got {self.sensitivity}")

    @property
    def rho(self) -> float:
        return self.sensitivity**2 / (2 * self.sigma**2)

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> np.ndarray:
        return gaussian_rdp(
            orders=orders, noise_multiplier=self.sigma, sensitivity=float(self.sensitivity)
        )

    def epsilon(self, *, delta: float, orders: Orders = DEFAULT_ORDERS) -> float:
        return eps_from_rdp(orders=orders, rdp=self.rdp(orders), delta=delta)[0]

    def release(self, *, value: int, rng: Rng) -> int:
        """value + N_ℤ(0, σ²)."""
        return noisy_count(value=value, sigma=self.sigma, rng=rng)

    @classmethod
    def calibrate(
        cls, *, epsilon: float, delta: float, sensitivity: int = 1, orders: Orders = DEFAULT_ORDERS
    ) -> DiscreteGaussianMechanism:
        """Smallest σ (to rounding) converting to ≤ ε at δ; never overshoots."""
        g = GaussianMechanism.calibrate(
            epsilon=epsilon, delta=delta, sensitivity=float(sensitivity), orders=orders
        )
        return cls(g.sigma, sensitivity)


@dataclass(frozen=True, slots=True)
class LaplaceMechanism:
    """f(D) + Lap(b), f of L1 sensitivity Δ: pure ε-DP with ε = Δ/b; RDP from Mironov 2017
    Prop. 6 (:func:`fedllm.privacy.rdp.laplace_rdp`)."""

    scale: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("scale", self.scale)
        _check_positive("sensitivity", self.sensitivity)

    @property
    def pure_epsilon(self) -> float:
        return self.sensitivity / self.scale

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> np.ndarray:
        return laplace_rdp(orders=orders, scale=self.scale, sensitivity=self.sensitivity)

    @classmethod
    def calibrate(cls, *, epsilon: float, sensitivity: float = 1.0) -> LaplaceMechanism:
        """scale = Δ/ε (rounded up so Δ/scale ≤ ε)."""
        _check_positive("epsilon", epsilon)
        _check_positive("sensitivity", sensitivity)
        scale = sensitivity / epsilon
        while sensitivity / scale > epsilon:
            scale = math.nextafter(scale, math.inf)
        return cls(scale, sensitivity)


def _gumbel(rng: random.Random) -> float:
    while True:
        u = rng.random()
        if u > 0:
            return -math.log(-math.log(u))


@dataclass(frozen=True, slots=True)
class ExponentialMechanism:
    """Pick i with probability ∝ exp(ε·u_i/(2Δ)), u of sensitivity Δ (McSherry–Talwar 2007):
    pure ε-DP, hence RDP min(ε, α·ε²/2) (:func:`fedllm.privacy.rdp.pure_dp_rdp`).

    Sampled by Gumbel-max: argmax_i ε·u_i/(2Δ) + G_i, G_i ~ Gumbel(0, 1) i.i.d. This is exact in
    real arithmetic; in doubles it inherits floating-point artefacts, which matter less for a
    selection (the output is an index) than for a released real value.
    """

    epsilon: float
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("epsilon", self.epsilon)
        _check_positive("sensitivity", self.sensitivity)

    def rdp(self, orders: Orders = DEFAULT_ORDERS) -> np.ndarray:
        return pure_dp_rdp(orders=orders, epsilon=self.epsilon)

    def probabilities(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """The exact selection distribution (softmax of ε·u/(2Δ))."""
        z = self.epsilon * np.asarray(scores, dtype=np.float64) / (2 * self.sensitivity)
        z = np.exp(z - np.max(z))
        out: np.ndarray = z / z.sum()
        return out

    def select(self, scores: Sequence[float] | np.ndarray, rng: Rng) -> int:
        """Index drawn with probability ∝ exp(ε·score/(2Δ)), by Gumbel-max."""
        u = np.asarray(scores, dtype=np.float64)
        if u.ndim != 1 or u.size == 0:
            raise ValueError("scores must be a non-empty 1-D sequence")
        if not np.isfinite(u).all():
            raise ValueError("scores must be finite")
        if isinstance(rng, np.random.Generator):
            g = rng.gumbel(size=u.size)
        else:
            g = np.array([_gumbel(rng) for _ in range(u.size)])
        return int(np.argmax(self.epsilon * u / (2 * self.sensitivity) + g))

"""Rényi-DP curves of the mechanisms fedllm uses, and their conversion to (ε, δ).

Pure functions of their arguments: no I/O, no state. An RDP curve is an array ``rdp`` aligned
with an array ``orders`` (α ≥ 1): the mechanism is (α, rdp[i])-RDP at every α = orders[i].
Composition is pointwise addition of curves over the same orders.

The maths follows Google's dp-accounting (``rdp_privacy_accountant.py``) and Opacus
(``analysis/rdp.py``); those libraries are used only as test references, never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

__all__ = [
    "DEFAULT_ORDERS",
    "classic_eps_from_rdp",
    "eps_from_rdp",
    "gaussian_rdp",
    "laplace_rdp",
    "pure_dp_rdp",
    "rho_for_epsilon",
    "subsampled_gaussian_rdp",
    "zcdp_rdp",
]

#: dp-accounting's ``DEFAULT_RDP_ORDERS``, built the same way so the floats are identical:
#: 1.1, 1.2, …, 10.9 (as ``1 + x / 10.0``), 11, …, 63, 128, 256, 512, 1024.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    float(a)
    for a in [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)

# Below this order the improved conversion is numerically unstable (as dp-accounting).
_MIN_ORDER_FOR_CONVERSION = 1.01
_MAX_SERIES_TERMS = 1000


def _as_orders(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError("orders must be a one-dimensional sequence")
    if np.isnan(a).any() or (a < 1).any():
        raise ValueError(f"Rényi orders must be >= 1; got {orders!r}")
    return a


def _as_curve(
    orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    a = _as_orders(orders)
    r = np.asarray(rdp, dtype=np.float64)
    if r.shape != a.shape:
        raise ValueError(f"orders and rdp must have the same length ({a.shape} vs {r.shape})")
    if np.isnan(r).any():
        # dp-accounting would turn a NaN into ε = 0; refuse instead.
        raise ValueError("RDP values must not be NaN")
    return a, r


# --------------------------------------------------------------------------- conversion


def eps_from_rdp(
    *, orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """(ε, best α) for target δ from an RDP curve, via the improved conversion.

    ε = min_α [ ε_α + log1p(−1/α) − log(δ·α)/(α−1) ]
    (Balle et al. 2020, Thm 21; Canonne–Kamath–Steinke 2020, Prop. 12), mirroring
    ``dp_accounting.rdp.compute_epsilon`` including its edge cases:

    * δ = 0: ε = 0 if the curve is identically 0, else ∞ (best order reported as 0);
    * an order whose ε_α satisfies δ² > 1 − exp(−ε_α) gives ε = 0 (KL bound
      δ ≤ sqrt(1 − exp(−KL)), valid because ε_α ≥ KL);
    * orders α ≤ 1.01 are otherwise skipped (∞) because the bound is unstable there;
    * a negative ε_α (numerical noise from extreme events) gives ε = 0 at that order.

    Unlike dp-accounting, NaN values raise ``ValueError`` instead of yielding ε = 0.
    """
    if not delta >= 0:
        raise ValueError(f"delta must be >= 0; got {delta}")
    a, r = _as_curve(orders, rdp)
    if delta == 0:
        return (0.0, 0.0) if bool((r == 0).all()) else (math.inf, 0.0)
    eps = np.full(a.shape, np.inf)
    negative = r < 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        kl = ~negative & (delta**2 + np.expm1(-r) > 0)
        main = ~negative & ~kl & (a > _MIN_ORDER_FOR_CONVERSION)
        improved = r + np.log1p(-1.0 / a) - np.log(delta * a) / (a - 1.0)
    eps[negative | kl] = 0.0
    eps[main] = improved[main]
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


def classic_eps_from_rdp(
    *, orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """(ε, best α) via the classic conversion ε = min_α [ε_α + log(1/δ)/(α−1)] (Mironov 2017,
    Prop. 3). Looser than :func:`eps_from_rdp`; kept for comparison. Order 1 is skipped."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    a, r = _as_curve(orders, rdp)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where(a > 1, r + math.log(1 / delta) / (a - 1.0), np.inf)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


# --------------------------------------------------------------------------- mechanisms


def gaussian_rdp(
    *, orders: Sequence[float] | np.ndarray, noise_multiplier: float, sensitivity: float = 1.0
) -> np.ndarray:
    """Gaussian mechanism N(0, σ²) on an L2-sensitivity-Δ query: ε_α = α·Δ²/(2σ²)
    (Mironov 2017, Prop. 7). Here σ = ``noise_multiplier`` in the query's units. σ = 0 gives ∞.
    """
    a = _as_orders(orders)
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}")
    if not sensitivity >= 0:
        raise ValueError(f"sensitivity must be >= 0; got {sensitivity}")
    if sensitivity == 0:
        return np.zeros_like(a)
    if noise_multiplier == 0:
        return np.full_like(a, np.inf)
    z = noise_multiplier / sensitivity
    with np.errstate(over="ignore"):
        return a / (2 * z**2)


def zcdp_rdp(*, orders: Sequence[float] | np.ndarray, rho: float) -> np.ndarray:
    """ρ-zCDP as an RDP curve: ε_α = ρ·α (Bun–Steinke 2016, Def. 1.1)."""
    a = _as_orders(orders)
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0; got {rho}")
    return rho * a


def pure_dp_rdp(*, orders: Sequence[float] | np.ndarray, epsilon: float) -> np.ndarray:
    """ε-DP (e.g. exponential mechanism, sparse vector) as RDP: ε_α = min(ε, α·ε²/2).

    ε-DP implies (ε²/2)-zCDP (Bun–Steinke 2016, Prop. 3.3) and ε-RDP at every order.
    """
    a = _as_orders(orders)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    return np.minimum(epsilon, a * epsilon**2 / 2)


def _laplace_rdp_one(eps: float, a: float) -> float:
    if math.isinf(a):
        return eps
    if a == 1:  # KL divergence, the limit α → 1
        return eps + math.expm1(-eps)
    c = math.expm1(eps * (1 - 2 * a)) / (2 * a - 1)
    if a < 1.1:
        # log1p(c·(α−1))/(α−1) by its Taylor series in v = −c·(α−1) ∈ [0, 0.1].
        v = -c * (a - 1)
        return eps + c * math.fsum(v ** (k - 1) / k for k in range(1, 100))
    return eps + math.log1p((a - 1) * c) / (a - 1)


def laplace_rdp(
    *, orders: Sequence[float] | np.ndarray, scale: float, sensitivity: float = 1.0
) -> np.ndarray:
    """Laplace mechanism Lap(b) on an L1-sensitivity-Δ query, ε = Δ/b (Mironov 2017, Prop. 6):

    ε_α = ε + log[1 + (α−1)·(exp((1−2α)·ε) − 1)/(2α−1)]/(α−1)   for α > 1,
    ε_1 = ε + exp(−ε) − 1 (KL, the α → 1 limit), ε_∞ = ε. Exact, and ≤ min(ε, α·ε²/2).
    """
    a = _as_orders(orders)
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale}")
    if not sensitivity >= 0:
        raise ValueError(f"sensitivity must be >= 0; got {sensitivity}")
    eps = sensitivity / scale
    if not math.isfinite(eps):
        return np.full_like(a, np.inf)
    return np.array([_laplace_rdp_one(eps, float(x)) for x in a], dtype=np.float64)


# Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019, arXiv 1908.10530).


def _log_comb(n: float | np.ndarray, k: float | np.ndarray) -> float | np.ndarray:
    out: float | np.ndarray = (
        special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
    )
    return out


def _log_add(x: float, y: float) -> float:
    lo, hi = min(x, y), max(x, y)
    if lo == -math.inf:
        return hi
    return math.log1p(math.exp(lo - hi)) + hi


def _log_erfc(x: float) -> float:
    return math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α: log Σ_i C(α,i) q^i (1−q)^(α−i) exp((i²−i)/(2σ²))."""
    i = np.arange(alpha + 1, dtype=np.float64)
    terms = (
        _log_comb(float(alpha), i)
        + i * math.log(q)
        + (alpha - i) * math.log1p(-q)
        + (i * i - i) / (2 * sigma**2)
    )
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α: the two-sided series of MTZ19 §3.3 (∞ if it fails to converge,
    which excludes the order from the ε minimum)."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log1mq = math.log(q), math.log1p(-q)
    last_s0 = last_s1 = -math.inf
    for i in range(_MAX_SERIES_TERMS):
        coef = float(_log_comb(alpha, i))
        j = alpha - i
        log_t0 = coef + i * log_q + j * log1mq
        log_t1 = coef + j * log_q + i * log1mq
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        log_a0, log_a1 = _log_add(log_a0, s0), _log_add(log_a1, s1)
        total = _log_add(log_a0, log_a1)
        if s0 < last_s0 and s1 < last_s1 and max(s0, s1) < total - 30:
            return total
        last_s0, last_s1 = s0, s1
    return math.inf


def subsampled_gaussian_rdp(
    *, orders: Sequence[float] | np.ndarray, q: float, noise_multiplier: float
) -> np.ndarray:
    """Poisson-subsampled Gaussian (sampling rate q, noise σ/Δ = ``noise_multiplier``,
    add/remove-one neighbours): ε_α = log(A_α)/(α−1) with A_α = E_{z∼μ0}[(μ(z)/μ0(z))^α],
    μ = (1−q)·μ0 + q·μ1 (Mironov, Talwar, Zhang 2019). Integer α by the binomial expansion,
    fractional α by the MTZ19 series. q = 0 gives 0, q = 1 the plain Gaussian, σ = 0 gives ∞.
    """
    a = _as_orders(orders)
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1]; got {q}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier}")

    def one(alpha: float) -> float:
        if q == 0:
            return 0.0
        if math.isinf(alpha) or noise_multiplier == 0:
            return math.inf
        if q == 1:
            return alpha / (2 * noise_multiplier**2)
        if alpha == 1:
            # α = 1 is the KL divergence; by joint convexity of KL it is ≤ q·KL(μ0‖μ1).
            return q / (2 * noise_multiplier**2)
        if float(alpha).is_integer():
            log_a = _log_a_int(q, noise_multiplier, int(alpha))
        else:
            log_a = _log_a_frac(q, noise_multiplier, alpha)
        return log_a / (alpha - 1)

    return np.array([one(float(x)) for x in a], dtype=np.float64)


# --------------------------------------------------------------------------- calibration


def _rho_candidate(*, epsilon: float, delta: float, orders: np.ndarray) -> float:
    """Closed-form sup ρ with eps_from_rdp(ρ·α) ≤ ε, order by order (before rounding)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
        formula = np.where(orders > _MIN_ORDER_FOR_CONVERSION, (epsilon - c) / orders, 0.0)
    kl = -math.log1p(-(delta**2)) / orders  # sup of the KL branch (not attained)
    return float(max(np.max(formula), np.max(kl), 0.0))


def rho_for_epsilon(
    *, epsilon: float, delta: float, orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS
) -> float:
    """The largest ρ ≥ 0 (to ~1e-13 relative) such that ``eps_from_rdp`` of the curve ρ·α is
    ≤ ε at δ. Never overshoots: the result is always checked with :func:`eps_from_rdp`.

    A closed-form candidate (solve ρα + log1p(−1/α) − log(δα)/(α−1) = ε per order, take the
    best order) brackets the answer; bisection then settles the last bits of rounding.
    """
    a = _as_orders(orders)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0; got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1); got {delta}")

    def ok(rho: float) -> bool:
        return eps_from_rdp(orders=a, rdp=rho * a, delta=delta)[0] <= epsilon

    hi = _rho_candidate(epsilon=epsilon, delta=delta, orders=a)
    if ok(hi):
        return hi
    lo = 0.0
    for shrink in (1e-15, 1e-12, 1e-9, 1e-6, 1e-3, 0.5):
        if ok(hi * (1 - shrink)):
            lo = hi * (1 - shrink)
            break
    for _ in range(200):
        mid = (lo + hi) / 2
        if not lo < mid < hi:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo

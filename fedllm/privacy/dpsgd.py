"""Privacy cost of DP-SGD rounds (Abadi et al. 2016; RDP as in Mironov, Talwar, Zhang 2019).

A round of ``steps`` DP-SGD steps, each on a Poisson sample of patients at rate ``q`` with
Gaussian noise multiplier σ (per-patient clip C, noise σ·C), is the ``steps``-fold composition of
the subsampled Gaussian; its RDP curve is steps · ε_SGM(α; q, σ), the curve Opacus' RDP
accountant computes. The node ledgers count zCDP ρ (curves ρ·α), so a round is charged the
smallest ρ whose curve dominates it on the accountant's orders: ρ = max_α ε(α)/α.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.privacy.rdp import DEFAULT_ORDERS, eps_from_rdp, subsampled_gaussian_rdp


def dp_sgd_rdp(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP curve of ``steps`` Poisson-subsampled Gaussian steps."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    return steps * subsampled_gaussian_rdp(
        orders=orders, q=sample_rate, noise_multiplier=noise_multiplier
    )


def dominating_rho(
    *, rdp: Sequence[float] | np.ndarray, orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS
) -> float:
    """Smallest ρ with rdp(α) ≤ ρ·α at every order where the curve is finite: the zCDP charge
    that covers the curve. Low fractional orders where the MTZ19 series does not converge are
    ∞ and skipped (the subsampled Gaussian's ε_α/α grows with α, so the larger orders bind)."""
    r = np.asarray(rdp, dtype=np.float64)
    a = np.asarray(orders, dtype=np.float64)
    finite = np.isfinite(r)
    if not finite.any():
        return float("inf")
    return float(np.max(r[finite] / a[finite]))


def dp_sgd_epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS,
) -> float:
    """(ε at δ) of ``steps`` DP-SGD steps, by the improved RDP conversion."""
    rdp = dp_sgd_rdp(
        sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders
    )
    return eps_from_rdp(orders=orders, rdp=rdp, delta=delta)[0]

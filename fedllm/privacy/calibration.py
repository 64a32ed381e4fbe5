"""Gaussian noise calibration: σ for a zCDP budget ρ, never overshooting it.

A Gaussian (or discrete Gaussian, Canonne–Kamath–Steinke 2020 Thm 14) release of L2 sensitivity
Δ with noise σ is Δ²/(2σ²)-zCDP (Bun–Steinke 2016), i.e. RDP α·Δ²/(2σ²). A release made of
parts i, each taking a share w_i of ρ (Σ w_i ≤ 1), uses σ_i = √(Δ_i²/(2ρ·w_i)), and spends
ρ' = Σ Δ_i²/(2σ_i²) = ρ in exact arithmetic. In doubles ρ' may come out a few ulps above ρ, so
every σ is widened (all together) until the caller's check holds: that is what "never overshoots"
means here. Every calibration loop in fedllm is :func:`widen`, started from :func:`sigma_for_rho`
or :func:`part_sigmas`; :func:`calibrate_parts` is the common case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "REL_STEP",
    "Part",
    "calibrate_parts",
    "part_sigmas",
    "sigma_for_rho",
    "spent_rho",
    "widen",
]

#: (Δ², share of ρ) of one Gaussian part of a release.
Part = tuple[float, float]

#: Relative widening of σ per step (absorbs float rounding in σ, ρ·α and the conversion).
REL_STEP = 1e-12


def sigma_for_rho(*, rho: float, sensitivity: float = 1.0) -> float:
    """Δ/√(2ρ): the σ whose zCDP parameter Δ²/(2σ²) is ρ (before rounding; not widened)."""
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"zCDP budget must be finite and > 0; got {rho}")
    return sensitivity / math.sqrt(2 * rho)


def part_sigmas(*, rho: float, parts: Sequence[Part]) -> list[float]:
    """σ_i = √(Δ_i²/(2ρ·w_i)) for each part (Δ_i², w_i) (before rounding; not widened)."""
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"zCDP budget must be finite and > 0; got {rho}")
    if any(not (d2 > 0 and w > 0) for d2, w in parts):
        raise ValueError(f"each part needs Δ² > 0 and a share > 0; got {list(parts)}")
    return [math.sqrt(d2 / (2 * rho * w)) for d2, w in parts]


def spent_rho(*, parts: Sequence[Part], sigmas: Sequence[float]) -> float:
    """Σ Δ_i²/(2σ_i²): the zCDP ρ the parts spend with these σ."""
    return sum(d2 / (2 * s * s) for (d2, _), s in zip(parts, sigmas, strict=True))


def widen(
    sigmas: Sequence[float],
    *,
    fits: Callable[[list[float]], bool],
    step: float | None = REL_STEP,
) -> list[float]:
    """The σ, widened together until ``fits`` holds: by a relative ``step`` at a time, or by one
    float (``math.nextafter``) when ``step`` is None."""
    out = list(sigmas)
    while not fits(out):
        if step is None:
            out = [math.nextafter(s, math.inf) for s in out]
        else:
            out = [s * (1 + step) for s in out]
    return out


def calibrate_parts(
    *,
    rho: float,
    parts: Sequence[Part],
    fits: Callable[[float], bool] | None = None,
) -> tuple[list[float], float]:
    """σ for each part, smallest to rounding, with spent ρ' ≤ ``rho`` (and ``fits(ρ')`` when
    given, e.g. "the stored curve converts to ≤ ε"); returns (σs, ρ')."""
    sigmas = widen(
        part_sigmas(rho=rho, parts=parts),
        fits=lambda s: (
            (spent := spent_rho(parts=parts, sigmas=s)) <= rho and (fits is None or fits(spent))
        ),
    )
    return sigmas, spent_rho(parts=parts, sigmas=sigmas)

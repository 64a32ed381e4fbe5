"""Consensus over k hospitals' DP releases of one aggregate query (pure post-processing).

``confidence_score`` ∈ [0, 1] is a function of the parts' DP releases and public configuration
only (docs/consensus.md), so publishing it costs no privacy beyond the parts themselves:

* ``mean``: per-hospital means xᵢ = released value, with s.d. sᵢ from the released noise s.d.s
  (delta method: sᵢ² ≈ (sum_sdᵢ² + (xᵢ − m)²·count_sdᵢ²) / max(Cᵢ, 1)², Cᵢ the noisy count,
  m the bounds' midpoint).
* ``count``/``sum``: per-patient rates xᵢ = valueᵢ / populationᵢ, populationᵢ the hospital's
  configured (public) population, sᵢ = sdᵢ / populationᵢ.
* For these, Cochran's Q = Σ wᵢ (xᵢ − x̄)² with wᵢ = 1/sᵢ² and x̄ the w-weighted mean, and the
  score is 1 − I² = min(1, (k − 1)/Q) (Higgins & Thompson 2002): 1 when the hospitals' figures
  differ by no more than the DP noise explains, towards 0 as real differences dominate.
* ``histogram``: the mean pairwise Jaccard similarity of the hospitals' released top-``top``
  categories.

``consensus_reached`` is ``confidence_score >= CONSENSUS_THRESHOLD`` (I² ≤ 50 %, "at most
moderate heterogeneity").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedllm.common.aggregates import Part

CONSENSUS_THRESHOLD = 0.5

__all__ = ["CONSENSUS_THRESHOLD", "Consensus", "consensus_of"]


@dataclass(frozen=True, slots=True)
class Consensus:
    reached: bool
    confidence: float
    method: str


def _num(x: object) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _estimates(
    parts: Sequence[Part], population: Mapping[str, int]
) -> list[tuple[float, float]] | None:
    """(xᵢ, sᵢ) per part, or None when a figure needed is missing."""
    out = []
    for p in parts:
        r = p.release
        op = r.get("op")
        if op == "mean":
            s_sum, s_cnt = _num(r.get("sum_sd")), _num(r.get("count_sd"))
            total, count = _num(r.get("noisy_sum")), _num(r.get("noisy_count"))
            bounds: Sequence[float] = r.get("bounds") or ()
            if None in (s_sum, s_cnt, total, count) or len(bounds) != 2:
                return None
            lo, hi = float(bounds[0]), float(bounds[1])
            c = max(count or 0.0, 1.0)
            x = min(max((total or 0.0) / c, lo), hi) if (count or 0) >= 1 else (lo + hi) / 2
            var = ((s_sum or 0.0) ** 2 + (x - (lo + hi) / 2) ** 2 * (s_cnt or 0.0) ** 2) / c**2
            out.append((x, math.sqrt(var)))
        else:
            value = _num(r.get("noisy_count" if op == "count" else "noisy_sum"))
            sd = _num(r.get("count_sd" if op == "count" else "sum_sd"))
            n = population.get(p.hospital_id, 0)
            if value is None or sd is None or n <= 0:
                return None
            out.append((value / n, sd / n))
    return out


def _top(part: Part) -> set[str]:
    hist = part.release.get("histogram") or ()
    top = int(part.release.get("top") or 5)
    ranked = sorted(((str(k), int(c)) for k, c in hist), key=lambda kv: (-kv[1], kv[0]))
    return {k for k, _ in ranked[:top]}


def consensus_of(parts: Sequence[Part], *, population: Mapping[str, int]) -> Consensus:
    """Agreement of ≥ 2 parts' releases (see the module docstring)."""
    if len(parts) < 2:
        raise ValueError("consensus needs at least two parts")
    op = parts[0].release.get("op")
    if op == "histogram":
        tops = [_top(p) for p in parts]
        pairs = list(itertools.combinations(tops, 2))
        score = sum(len(a & b) / max(len(a | b), 1) for a, b in pairs) / len(pairs)
        return Consensus(score >= CONSENSUS_THRESHOLD, score, "mean pairwise Jaccard of top sets")
    est = _estimates(parts, population)
    if est is None or any(s <= 0 for _, s in est):
        return Consensus(False, 0.0, "unavailable: a part lacks a figure or a public population")
    w = [1.0 / (s * s) for _, s in est]
    mean = sum(wi * x for wi, (x, _) in zip(w, est, strict=True)) / sum(w)
    q = sum(wi * (x - mean) ** 2 for wi, (x, _) in zip(w, est, strict=True))
    score = 1.0 if q <= len(est) - 1 else (len(est) - 1) / q
    what = "means" if op == "mean" else "per-patient rates (configured populations)"
    return Consensus(score >= CONSENSUS_THRESHOLD, score, f"1 - I² over the hospitals' {what}")

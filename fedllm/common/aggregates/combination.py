"""Combine the hospitals' parts of a fan-out aggregate query (pure post-processing).

Each part is one hospital's noisy release (:class:`~fedllm.common.aggregates.release.Part`):
noisy count and/or noisy sum, their noise s.d., or a noisy histogram over a public vocabulary.
Summing noisy figures is post-processing, so it costs nothing more. The privacy spent by any one
patient is the **pointwise sum** of the parts' RDP curves (sequential composition: a patient may
be treated at several hospitals, and no shared patient identifier rules that out); with
``disjoint_patients`` (each patient's records at one hospital only) parallel composition gives
the pointwise **max**. One combiner, as Flower keeps its aggregation maths once: the router runs
it, and ``scripts/utility_report.py`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.common.aggregates.release import Part
from fedllm.common.aggregates.rendering import render_combined
from fedllm.privacy.accountant import PrivacyCurve

__all__ = ["Combined", "combine_parts", "total_curve"]


@dataclass(frozen=True, slots=True)
class Combined:
    """The combined answer: what goes into the one InferenceResult the user sees."""

    value: float
    text: str
    curve: PrivacyCurve
    epsilon: float
    delta: float
    records_used: int
    release: dict[str, Any]


def total_curve(curves: Sequence[PrivacyCurve]) -> PrivacyCurve | None:
    """Pointwise sum of the curves (None for none); raises on different orders."""
    if not curves:
        return None
    return sum(curves[1:], curves[0])


def _max_curve(curves: Sequence[PrivacyCurve]) -> PrivacyCurve:
    """Pointwise max: at every α a patient is in one release only."""
    if any(c.orders != curves[0].orders for c in curves):
        raise ValueError("parts were accounted at different orders")
    values = zip(*(c.values for c in curves), strict=True)
    return PrivacyCurve(curves[0].orders, tuple(max(v) for v in values))


def _sum(parts: Sequence[Part], key: str) -> float | None:
    vals = [p.release.get(key) for p in parts]
    if any(not isinstance(v, int | float) or isinstance(v, bool) for v in vals):
        return None
    return float(sum(vals))  # type: ignore[arg-type]


def _sd(parts: Sequence[Part], key: str) -> float | None:
    sq = [p.release.get(key) for p in parts]
    nums = [float(v) for v in sq if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(sq):
        return None
    return math.sqrt(sum(x**2 for x in nums))


def combine_parts(parts: Sequence[Part], *, disjoint_patients: bool = False) -> Combined:
    """Sum the parts' noisy releases; the spend is the sum of their curves (the max with
    ``disjoint_patients``)."""
    if not parts:
        raise ValueError("nothing to combine")
    first = parts[0].release
    for p in parts[1:]:
        if (p.release.get("query_key"), p.release.get("op")) != (
            first.get("query_key"),
            first.get("op"),
        ):
            raise ValueError("parts answer different queries")
        if p.delta != parts[0].delta:
            raise ValueError("parts were released at different deltas")
    curves = [p.curve for p in parts]
    curve = _max_curve(curves) if disjoint_patients else total_curve(curves)
    assert curve is not None
    delta = parts[0].delta
    op, field = first["op"], first.get("field")
    bounds = first.get("bounds")
    count, noisy_sum = _sum(parts, "noisy_count"), _sum(parts, "noisy_sum")
    count_sd, sum_sd = _sd(parts, "count_sd"), _sd(parts, "sum_sd")
    histogram: list[list[Any]] | None = None
    if op == "count":
        if count is None:
            raise ValueError("a count part lacks its noisy count")
        value = count
    elif op == "sum":
        if noisy_sum is None:
            raise ValueError("a sum part lacks its noisy sum")
        value = noisy_sum
    elif op == "mean":
        if count is None or noisy_sum is None or not bounds:
            raise ValueError("a mean part lacks its noisy count, sum or bounds")
        lo, hi = float(bounds[0]), float(bounds[1])
        value = min(max(noisy_sum / count, lo), hi) if count >= 1 else (lo + hi) / 2
    else:
        totals: dict[str, int] = {}
        for p in parts:
            for key, c in p.release.get("histogram") or ():
                totals[str(key)] = totals.get(str(key), 0) + int(c)
        if not totals:
            raise ValueError("a histogram part lacks its histogram")
        histogram = [[k, c] for k, c in totals.items()]
        value = float(max(totals.values()))

    epsilon = curve.epsilon(delta=delta)
    release = {
        "op": op,
        "field": field,
        "query_key": first.get("query_key"),
        "bounds": bounds,
        "value": value,
        "noisy_count": None if count is None else int(count),
        "noisy_sum": noisy_sum,
        "count_sd": count_sd,
        "sum_sd": sum_sd,
        "histogram": histogram,
        "hospitals": [p.hospital_id for p in parts],
        "epsilon": epsilon,
        "delta": delta,
    }
    text = render_combined(
        release,
        hospitals=release["hospitals"],
        top=int(first.get("top") or 5),
        disjoint_patients=disjoint_patients,
    )
    return Combined(
        value=value,
        text=text,
        curve=curve,
        epsilon=epsilon,
        delta=delta,
        records_used=sum(p.records_used for p in parts),
        release=release,
    )

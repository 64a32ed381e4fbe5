"""Combine the hospitals' parts of a fan-out aggregate query (pure post-processing).

Each part is an InferenceResult with status "partial" whose ``aggregate_json`` holds one
hospital's noisy release (see the node worker's aggregate module): noisy count and/or noisy sum,
their noise s.d., or a noisy histogram over a public vocabulary. Summing noisy figures is
post-processing, so it costs nothing more; the privacy spent is the **pointwise sum** of the
parts' RDP curves (sequential composition: a patient may be treated at several hospitals).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.privacy.accountant import PrivacyCurve


@dataclass(frozen=True, slots=True)
class Part:
    """One hospital's released part."""

    hospital_id: str
    curve: PrivacyCurve
    delta: float
    records_used: int
    release: dict[str, Any]


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


def part_curve(result: Mapping[str, Any]) -> PrivacyCurve | None:
    """The RDP curve a node result reports as spent, or None if it reports none."""
    orders, values = result.get("rdp_orders") or [], result.get("rdp_epsilons") or []
    if not orders:
        return None
    return PrivacyCurve(tuple(orders), tuple(values))


def parse_part(result: Mapping[str, Any]) -> Part:
    """A "partial" InferenceResult as a Part; raises ValueError if it cannot be combined."""
    curve = part_curve(result)
    if curve is None:
        raise ValueError(f"part from {result.get('node_id')!r} carries no privacy curve")
    try:
        release = json.loads(result.get("aggregate_json") or "")
    except ValueError as exc:
        raise ValueError(f"part from {result.get('node_id')!r}: bad aggregate_json") from exc
    if not isinstance(release, dict) or release.get("op") not in (
        "count",
        "sum",
        "mean",
        "histogram",
    ):
        raise ValueError(f"part from {result.get('node_id')!r}: not an aggregate release")
    return Part(
        hospital_id=str(result.get("node_id", "")),
        curve=curve,
        delta=float(result.get("delta", 0.0)),
        records_used=int(result.get("records_used", 0)),
        release=release,
    )


def total_curve(curves: Sequence[PrivacyCurve]) -> PrivacyCurve | None:
    """Pointwise sum of the curves (None for none); raises on different orders."""
    if not curves:
        return None
    return sum(curves[1:], curves[0])


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


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _describe(release: Mapping[str, Any]) -> str:
    try:
        q = json.loads(release.get("query_key") or "{}")
    except ValueError:
        q = {}
    parts = []
    if q.get("diagnosis"):
        parts.append(f"diagnosis ~ {q['diagnosis']!r}")
    if q.get("medication"):
        parts.append(f"medication ~ {q['medication']!r}")
    if q.get("sex"):
        parts.append(f"sex {q['sex']}")
    if q.get("age_min") is not None or q.get("age_max") is not None:
        lo = q.get("age_min") if q.get("age_min") is not None else 0
        hi = q.get("age_max") if q.get("age_max") is not None else "∞"
        parts.append(f"age {lo}–{hi}")
    return "patients" + (f" with {', '.join(parts)}" if parts else "")


def combine_parts(parts: Sequence[Part]) -> Combined:
    """Sum the parts' noisy releases; the spend is the sum of their curves."""
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
    curve = total_curve([p.curve for p in parts])
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

    where = f"across {len(parts)} hospitals ({', '.join(p.hospital_id for p in parts)})"
    desc = _describe(first)
    if op == "count":
        body = f"About {_fmt(value)} {desc} {where} (noise s.d. {count_sd or 0:.2g})."
    elif op == "sum":
        body = (
            f"Sum of {field} over {desc} {where}: about {_fmt(value)} (each patient "
            f"clipped to {bounds}; noise s.d. {sum_sd or 0:.2g})."
        )
    elif op == "mean":
        body = (
            f"Mean {field} of {desc} {where}: about {_fmt(value)} (from a noisy sum and a "
            f"noisy count of about {_fmt(count or 0)}; values clipped to {bounds})."
        )
    else:
        top = int(first.get("top") or 5)
        ranked = sorted(histogram or (), key=lambda kv: (-kv[1], kv[0]))[:top]
        items = "; ".join(f"{k} ≈ {c}" for k, c in ranked)
        body = (
            f"Most frequent {field} categories among {desc} {where} (noisy patient counts, "
            f"noise s.d. {count_sd or 0:.2g}): {items}."
        )
    epsilon = curve.epsilon(delta=delta)
    text = (
        f"{body} Each hospital released its own differentially private figure; privacy "
        f"loss to any one patient: ε ≤ {epsilon:.3g} at δ={delta:g} (sum over hospitals; "
        f"patients may overlap). Exact figures are never released."
    )
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
    return Combined(
        value=value,
        text=text,
        curve=curve,
        epsilon=epsilon,
        delta=delta,
        records_used=sum(p.records_used for p in parts),
        release=release,
    )

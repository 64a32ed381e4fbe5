"""The user-facing texts of aggregate answers: one hospital's, and a fan-out's combination.

Every figure named is a DP output or public (the query, its bounds, the noise s.d., ε and δ).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fedllm.common.aggregates.release import AggregateAnswer

__all__ = ["describe", "fmt", "render_answer", "render_combined"]


def fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def describe(query_key: str | None) -> str:
    """The patients a query counts, in words, from its canonical key (``AggregateQuery.key``);
    "patients" when the key says nothing readable."""
    try:
        q = json.loads(query_key or "{}")
    except ValueError:
        q = {}
    if not isinstance(q, dict):
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


def render_answer(a: AggregateAnswer, *, labels: Mapping[str, str]) -> str:
    """One hospital's answer; ``labels`` names the histogram field's public candidates."""
    where = "at this hospital"
    q_desc = describe(a.query_key)
    dp = f"differentially private (ε={a.epsilon:g}, δ={a.delta:g} per hospital release)"
    if a.op == "count":
        body = f"About {fmt(a.value)} {q_desc} {where} (noise s.d. {a.count_sd:.2g})."
    elif a.op == "sum":
        body = (
            f"Sum of {a.field} over {q_desc} {where}: about {fmt(a.value)} "
            f"(each patient clipped to {a.bounds}; noise s.d. {a.sum_sd:.2g})."
        )
    elif a.op == "mean":
        body = (
            f"Mean {a.field} of {q_desc} {where}: about {fmt(a.value)} "
            f"(from a noisy sum and a noisy count of about {a.noisy_count}; values clipped "
            f"to {a.bounds})."
        )
    else:
        ranked = sorted(a.histogram or (), key=lambda kv: (-kv[1], kv[0]))[: a.top]
        items = "; ".join(f"{labels.get(k, k)} ≈ {c}" for k, c in ranked)
        plural = "diagnoses" if a.field == "diagnosis" else "medications"
        body = (
            f"Most frequent {plural} among {q_desc} {where} (noisy patient counts over "
            f"{len(labels)} public candidates, noise s.d. {a.count_sd:.2g}; counts below "
            f"about {3 * (a.count_sd or 0):.0f} are indistinguishable from zero): {items}."
        )
    return f"{body} This answer is {dp}; exact figures are never released."


def render_combined(
    release: Mapping[str, Any],
    *,
    hospitals: Sequence[str],
    top: int,
    disjoint_patients: bool = False,
) -> str:
    """A fan-out's combined answer (``release`` as :func:`combine_parts` builds it)."""
    op, field, bounds = release["op"], release.get("field"), release.get("bounds")
    value, count = release["value"], release.get("noisy_count")
    count_sd, sum_sd = release.get("count_sd"), release.get("sum_sd")
    where = f"across {len(hospitals)} hospitals ({', '.join(hospitals)})"
    desc = describe(release.get("query_key"))
    if op == "count":
        body = f"About {fmt(value)} {desc} {where} (noise s.d. {count_sd or 0:.2g})."
    elif op == "sum":
        body = (
            f"Sum of {field} over {desc} {where}: about {fmt(value)} (each patient "
            f"clipped to {bounds}; noise s.d. {sum_sd or 0:.2g})."
        )
    elif op == "mean":
        body = (
            f"Mean {field} of {desc} {where}: about {fmt(value)} (from a noisy sum and a "
            f"noisy count of about {fmt(count or 0)}; values clipped to {bounds})."
        )
    else:
        ranked = sorted(release.get("histogram") or (), key=lambda kv: (-kv[1], kv[0]))[:top]
        items = "; ".join(f"{k} ≈ {c}" for k, c in ranked)
        body = (
            f"Most frequent {field} categories among {desc} {where} (noisy patient counts, "
            f"noise s.d. {count_sd or 0:.2g}): {items}."
        )
    rule = (
        "max over hospitals; each patient's records are at one hospital"
        if disjoint_patients
        else "sum over hospitals; patients may overlap"
    )
    return (
        f"{body} Each hospital released its own differentially private figure; privacy "
        f"loss to any one patient: ε ≤ {release['epsilon']:.3g} at δ={release['delta']:g} "
        f"({rule}). Exact figures are never released."
    )

"""One hospital's aggregate release: the answer object, its wire form, and a fan-out part.

A node answers a query with an :class:`AggregateAnswer`; as a part of a fan-out it sends
:func:`release_of` (noisy figures and public metadata only) in the InferenceResult's
``aggregate_json``, with the curve it spent in ``rdp_orders``/``rdp_epsilons``; the router reads
that result back as a :class:`Part` (:func:`parse_part`). :func:`part_of` is the same round trip
without the topic (for ``scripts/utility_report.py`` and tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedllm.common.aggregate_query import OPS
from fedllm.privacy.accountant import PrivacyCurve

__all__ = ["AggregateAnswer", "Part", "parse_part", "part_curve", "part_of", "release_of"]


@dataclass(frozen=True, slots=True)
class AggregateAnswer:
    """A released answer: everything here is DP output or public, nothing is exact.

    ``curve`` is the privacy actually spent by this release; ``records_used`` is the number of
    patients scanned (cohort size, treated as public hospital metadata), never the number
    matched.
    """

    op: str
    field: str | None
    value: float
    text: str
    curve: PrivacyCurve
    records_used: int
    epsilon: float
    delta: float
    query_key: str
    noisy_count: int | None = None
    noisy_sum: float | None = None
    count_sd: float | None = None
    sum_sd: float | None = None
    bounds: tuple[float, float] | None = None
    histogram: tuple[tuple[str, int], ...] | None = None
    top: int = 5


def release_of(answer: AggregateAnswer) -> dict[str, Any]:
    """The DP release of an answer (noisy figures and public metadata only), as the router's
    combiner reads it from ``aggregate_json``."""
    a = answer
    return {
        "op": a.op,
        "field": a.field,
        "query_key": a.query_key,
        "bounds": list(a.bounds) if a.bounds is not None else None,
        "top": a.top,
        "noisy_count": a.noisy_count,
        "noisy_sum": a.noisy_sum,
        "count_sd": a.count_sd,
        "sum_sd": a.sum_sd,
        "histogram": [list(kv) for kv in a.histogram] if a.histogram is not None else None,
        "records_used": 0,  # never leaves the node
        "epsilon": a.epsilon,
        "delta": a.delta,
    }


@dataclass(frozen=True, slots=True)
class Part:
    """One hospital's released part of a fan-out."""

    hospital_id: str
    curve: PrivacyCurve
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
    if not isinstance(release, dict) or release.get("op") not in OPS:
        raise ValueError(f"part from {result.get('node_id')!r}: not an aggregate release")
    return Part(
        hospital_id=str(result.get("node_id", "")),
        curve=curve,
        delta=float(result.get("delta", 0.0)),
        records_used=int(result.get("records_used", 0)),
        release=release,
    )


def part_of(answer: AggregateAnswer, *, hospital_id: str) -> Part:
    """The Part the router reads from a node that released ``answer`` (the same JSON round
    trip; the node reports ``records_used`` 0)."""
    return parse_part(
        {
            "node_id": hospital_id,
            "rdp_orders": list(answer.curve.orders),
            "rdp_epsilons": list(answer.curve.values),
            "delta": answer.delta,
            "records_used": 0,
            "aggregate_json": json.dumps(release_of(answer), separators=(",", ":")),
        }
    )

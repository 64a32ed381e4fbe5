"""Differentially private aggregate queries over one hospital's per-patient table.

Query grammar and validation: :mod:`fedllm.common.aggregate_query` (shared with the gateway,
which refuses a bad query before anything is charged); the answer, its wire form, its text and
the fan-out combination: :mod:`fedllm.common.aggregates` (shared with the router). Query::

    {"op": "count" | "sum" | "mean" | "histogram",
     "field": "age" | "encounters" | "diagnoses" | "medications"   # sum/mean
              | "diagnosis" | "medication",                          # histogram
     "where": {"diagnosis": "E11" | "diabetes", "medication": "metformin",
               "age_min": 40, "age_max": 65, "sex": "F"},
     "bounds": [lo, hi],        # optional, sum/mean: public clipping range of the field
     "top": 5,                  # optional, histogram: how many candidates the text names
     "max_per_patient": 8}      # optional, histogram: contribution cap K

Neighbouring relation: one person (all of their records) added or removed. Each patient is one
row (:mod:`fedllm.services.node_worker.cohort`) and a person (a mother and her newborn are one) counts
through one matching row only, so every release below has a stated sensitivity:

* ``count``: number of matching patients, Δ = 1.
* ``sum``: Σ clip(x, lo, hi) over matching patients on the grid (1/g)ℤ, Δ = max(|lo|, |hi|)
  (in grid steps: max(|round(g·lo)|, |round(g·hi)|)).
* ``mean``: a noisy count (share 1 − w of ρ) and a noisy *centred* sum Σ (x − m), m the grid
  midpoint of [lo, hi], Δ = (hi − lo)/2 (share w = :data:`MEAN_SUM_SHARE`); the mean is
  m + S/max(C, 1), clamped to [lo, hi] (post-processing). ``noisy_sum`` reports S + m·C.
* ``histogram``: a count for every entry of a **public** vocabulary (clinosim's ICD-10-CM
  categories or drug list, never taken from the records); a patient adds 1 to at most K
  entries (a uniformly random K of theirs if they have more), so the L2 sensitivity is √K.

Noise is the exact discrete Gaussian N_ℤ(0, σ²) (Canonne–Kamath–Steinke 2020), which is
Δ²/(2σ²)-zCDP, i.e. RDP α·Δ²/(2σ²). σ is set so the total is ρ = ``rho_for_epsilon(ε, δ)``
(never above it), and the answer carries the curve actually spent. Patients whose field is
unknown (e.g. no birth date for ``age``) do not match a sum/mean or an age filter.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.common.aggregate_query import (
    FIELD_BOUNDS,
    HISTOGRAM_FIELDS,
    OPS,
    AggregateQuery,
    parse_query,
)
from fedllm.common.aggregates import AggregateAnswer, render_answer
from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.calibration import calibrate_parts
from fedllm.privacy.mechanisms import noisy_count, sample_discrete_gaussian
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.cohort import (
    Cohort,
    PatientRecord,
    VocabEntry,
    diagnosis_category,
    diagnosis_vocabulary,
    load_cohort,
    medication_key,
    medication_vocabulary,
)

__all__ = [
    "FIELD_BOUNDS",
    "HISTOGRAM_FIELDS",
    "MEAN_SUM_SHARE",
    "OPS",
    "AggregateAnswer",
    "AggregateQuery",
    "answer_aggregate",
    "answer_on_cohort",
    "histogram_keys",
    "parse_query",
]

Rng = random.Random | np.random.Generator

GRANULARITY = 1
#: Share of ρ spent on the centred sum of a mean; the rest goes to the count. The variance of
#: the mean is ≈ (Δ_s²/ρ_s + (μ − m)²/ρ_c)/(2C²), minimised at ρ_s/ρ_c = Δ_s/|μ − m|; with the
#: centred sum |μ − m| ≤ Δ_s, and 3/4 is optimal for |μ − m| = Δ_s/3 (fixed a priori, no data).
MEAN_SUM_SHARE = 0.75


def _calibrate(
    *, rho: float, epsilon: float, delta: float, parts: Sequence[tuple[float, float]]
) -> tuple[list[float], PrivacyCurve]:
    """σ for each (Δ², share of ρ) part (:func:`fedllm.privacy.calibration.calibrate_parts`)
    such that Σ Δ²/(2σ²) ≤ ρ and the stored curve (ρ_spent·α) converts to ≤ ε; and that curve."""

    def fits(spent: float) -> bool:
        curve = PrivacyCurve.from_rho(spent)
        return curve.rho_upper() <= rho and curve.epsilon(delta=delta) <= epsilon

    sigmas, spent = calibrate_parts(rho=rho, parts=parts, fits=fits)
    return sigmas, PrivacyCurve.from_rho(spent)


def _grid(x: float) -> int:
    return round(x * GRANULARITY)  # half-to-even, monotone


def _value(p: PatientRecord, field: str) -> int | None:
    if field == "age":
        return p.age
    if field == "encounters":
        return p.encounters
    if field == "diagnoses":
        return len(p.diagnoses)
    return len(p.medications)


def _vocab(field: str) -> tuple[VocabEntry, ...]:
    return diagnosis_vocabulary() if field == "diagnosis" else medication_vocabulary()


@functools.cache
def _diagnosis_keys() -> frozenset[str]:
    return frozenset(e.key for e in diagnosis_vocabulary())


def histogram_keys(p: PatientRecord, field: str) -> set[str]:
    """The public-vocabulary keys a patient has for a histogram field (before the cap K)."""
    if field == "diagnosis":
        keys = {diagnosis_category(d.code) for d in p.diagnoses}
        return keys & _diagnosis_keys()
    return {k for m in p.medications if (k := medication_key(m)) is not None}


def _sample(rng: Rng, items: set[str], k: int) -> list[str]:
    ordered = sorted(items)
    if len(ordered) <= k:
        return ordered
    if isinstance(rng, np.random.Generator):
        return [ordered[i] for i in rng.choice(len(ordered), size=k, replace=False)]
    return rng.sample(ordered, k)


def answer_on_cohort(
    *,
    query: Mapping[str, Any] | str | AggregateQuery,
    cohort: Cohort,
    epsilon: float,
    delta: float,
    rng: Rng,
    rho: float | None = None,
) -> AggregateAnswer:
    """Answer one query on a loaded cohort under ρ = ``rho_for_epsilon(ε, δ)`` zCDP, or under
    the smaller ``rho`` when given (a hospital's share of a fan-out's reservation)."""
    q = query if isinstance(query, AggregateQuery) else parse_query(query)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be finite and > 0; got {epsilon}")
    full = rho_for_epsilon(epsilon=epsilon, delta=delta)
    if rho is not None and not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0; got {rho}")
    rho = full if rho is None else min(rho, full)
    if not rho > 0:
        raise ValueError(f"no zCDP budget for epsilon={epsilon} at delta={delta}")
    if rho < full:  # report the ε this release is calibrated to, not the reservation's
        epsilon = min(epsilon, PrivacyCurve.from_rho(rho).epsilon(delta=delta))
    matched = _one_row_per_person(q, cohort)
    common: dict[str, Any] = dict(
        op=q.op,
        field=q.field,
        records_used=len(cohort),
        epsilon=epsilon,
        delta=delta,
        query_key=q.key,
        bounds=q.bounds,
        top=q.top,
    )

    if q.op == "count":
        (s,), curve = _calibrate(rho=rho, epsilon=epsilon, delta=delta, parts=[(1.0, 1.0)])
        c = noisy_count(value=len(matched), sigma=s, rng=rng)
        a = AggregateAnswer(
            value=float(c),
            text="",
            curve=curve,
            noisy_count=c,
            count_sd=s,
            **common,
        )
    elif q.op in ("sum", "mean"):
        assert q.field is not None and q.bounds is not None
        lo_u, hi_u = _grid(q.bounds[0]), _grid(q.bounds[1])
        vals = [v for p in matched if (v := _value(p, q.field)) is not None]
        units = [_grid(min(max(float(v), q.bounds[0]), q.bounds[1])) for v in vals]
        if q.op == "sum":
            d2 = float(max(abs(lo_u), abs(hi_u))) ** 2
            (s,), curve = _calibrate(rho=rho, epsilon=epsilon, delta=delta, parts=[(d2, 1.0)])
            total = noisy_count(value=sum(units), sigma=s, rng=rng) / GRANULARITY
            a = AggregateAnswer(
                value=total,
                text="",
                noisy_sum=total,
                sum_sd=s / GRANULARITY,
                curve=curve,
                **common,
            )
        else:
            mid_u = (lo_u + hi_u) // 2
            d2 = float(max(hi_u - mid_u, mid_u - lo_u)) ** 2
            (s_sum, s_cnt), curve = _calibrate(
                rho=rho,
                epsilon=epsilon,
                delta=delta,
                parts=[(d2, MEAN_SUM_SHARE), (1.0, 1 - MEAN_SUM_SHARE)],
            )
            c = noisy_count(value=len(units), sigma=s_cnt, rng=rng)
            centred = noisy_count(value=sum(u - mid_u for u in units), sigma=s_sum, rng=rng)
            total = (centred + mid_u * c) / GRANULARITY
            mean = _clamp(total / max(c, 1), q.bounds) if c >= 1 else mid_u / GRANULARITY
            a = AggregateAnswer(
                value=mean,
                text="",
                noisy_count=c,
                noisy_sum=total,
                count_sd=s_cnt,
                sum_sd=s_sum / GRANULARITY,
                curve=curve,
                **common,
            )
    else:
        assert q.field is not None and q.max_per_patient is not None
        vocab = _vocab(q.field)
        index = {e.key: i for i, e in enumerate(vocab)}
        counts = np.zeros(len(vocab), dtype=np.int64)
        for p in matched:
            for key in _sample(rng, histogram_keys(p, q.field), q.max_per_patient):
                counts[index[key]] += 1
        d2 = float(q.max_per_patient)  # L2² of a patient's 0/1 vector with ≤ K ones
        (s,), curve = _calibrate(rho=rho, epsilon=epsilon, delta=delta, parts=[(d2, 1.0)])
        noisy = counts + sample_discrete_gaussian(sigma=s, size=len(vocab), rng=rng)
        hist = tuple((e.key, int(n)) for e, n in zip(vocab, noisy, strict=True))
        a = AggregateAnswer(
            value=float(noisy.max()),
            text="",
            histogram=hist,
            count_sd=s,
            curve=curve,
            **common,
        )
    return _with_text(a)


def _one_row_per_person(q: AggregateQuery, cohort: Cohort) -> list[PatientRecord]:
    """The matching rows, at most one per person (the first by patient id): the unit of privacy
    is a person, so linked rows (a mother and her newborn) contribute as one."""
    seen: set[str] = set()
    out = []
    for p in sorted(cohort.patients, key=lambda r: r.patient_id):
        if p.person not in seen and q.matches(p):
            seen.add(p.person)
            out.append(p)
    return out


def affected_persons(query: AggregateQuery, cohort: Cohort) -> set[str]:
    """Persons whose records can change this query's release: those with a matching row.
    Removing a person with no matching row leaves every count, sum and histogram unchanged,
    so their individual loss is 0 (docs/privacy.md)."""
    return {p.person for p in cohort.patients if query.matches(p)}


def without_persons(cohort: Cohort, exclude: frozenset[str]) -> Cohort:
    """The cohort minus the persons at their cap (as if their records were absent)."""
    if not exclude:
        return cohort
    return replace(cohort, patients=tuple(p for p in cohort.patients if p.person not in exclude))


def _clamp(x: float, bounds: tuple[float, float]) -> float:
    return min(max(x, bounds[0]), bounds[1])


def _with_text(a: AggregateAnswer) -> AggregateAnswer:
    labels = {e.key: e.label for e in _vocab(a.field)} if a.op == "histogram" and a.field else {}
    return replace(a, text=render_answer(a, labels=labels))


def answer_aggregate(
    *,
    query: Mapping[str, Any] | str,
    cohort_dir: Path,
    epsilon: float,
    delta: float,
    rng: Rng,
    rho: float | None = None,
) -> AggregateAnswer:
    """Answer a query on the hospital records under ``cohort_dir`` (clinosim output)."""
    q = parse_query(query)  # validate before touching the records
    return answer_on_cohort(
        query=q, cohort=load_cohort(cohort_dir), epsilon=epsilon, delta=delta, rng=rng, rho=rho
    )

"""Differentially private aggregate queries over one hospital's per-patient table.

Query grammar and validation: :mod:`fedllm.common.aggregate_query` (shared with the gateway,
which refuses a bad query before anything is charged). Query::

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
import json
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.common.aggregate_query import (
    FIELD_BOUNDS,
    HISTOGRAM_FIELDS,
    OPS,
    WHERE_KEYS,
    AggregateQuery,
    parse_query,
)
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
    "combine",
    "histogram_keys",
    "parse_query",
]

Rng = random.Random | np.random.Generator

GRANULARITY = 1
#: Share of ρ spent on the centred sum of a mean; the rest goes to the count. The variance of
#: the mean is ≈ (Δ_s²/ρ_s + (μ − m)²/ρ_c)/(2C²), minimised at ρ_s/ρ_c = Δ_s/|μ − m|; with the
#: centred sum |μ − m| ≤ Δ_s, and 3/4 is optimal for |μ − m| = Δ_s/3 (fixed a priori, no data).
MEAN_SUM_SHARE = 0.75


# --------------------------------------------------------------------------- answer


@dataclass(frozen=True, slots=True)
class AggregateAnswer:
    """A released answer: everything here is DP output or public, nothing is exact.

    ``curve`` is the privacy actually spent by this release (per hospital for a combined answer,
    see :func:`combine`); ``records_used`` is the number of patients scanned (cohort size,
    treated as public hospital metadata), never the number matched.
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
    hospitals: int = 1
    disjoint_patients: bool = False


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


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _describe(q: AggregateQuery) -> str:
    parts = []
    if q.diagnosis:
        parts.append(f"diagnosis ~ {q.diagnosis!r}")
    if q.medication:
        parts.append(f"medication ~ {q.medication!r}")
    if q.sex:
        parts.append(f"sex {q.sex}")
    if q.age_min is not None or q.age_max is not None:
        parts.append(
            f"age {q.age_min if q.age_min is not None else 0}–"
            f"{q.age_max if q.age_max is not None else '∞'}"
        )
    return "patients" + (f" with {', '.join(parts)}" if parts else "")


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


def _render(a: AggregateAnswer, q_desc: str) -> str:
    where = "across " + f"{a.hospitals} hospitals" if a.hospitals > 1 else "at this hospital"
    dp = f"differentially private (ε={a.epsilon:g}, δ={a.delta:g} per hospital release)"
    if a.op == "count":
        body = f"About {_fmt(a.value)} {q_desc} {where} (noise s.d. {a.count_sd:.2g})."
    elif a.op == "sum":
        body = (
            f"Sum of {a.field} over {q_desc} {where}: about {_fmt(a.value)} "
            f"(each patient clipped to {a.bounds}; noise s.d. {a.sum_sd:.2g})."
        )
    elif a.op == "mean":
        body = (
            f"Mean {a.field} of {q_desc} {where}: about {_fmt(a.value)} "
            f"(from a noisy sum and a noisy count of about {a.noisy_count}; values clipped "
            f"to {a.bounds})."
        )
    else:
        labels = {e.key: e.label for e in _vocab(a.field or "")}
        ranked = sorted(a.histogram or (), key=lambda kv: (-kv[1], kv[0]))[: a.top]
        items = "; ".join(f"{labels.get(k, k)} ≈ {c}" for k, c in ranked)
        plural = "diagnoses" if a.field == "diagnosis" else "medications"
        body = (
            f"Most frequent {plural} among {q_desc} {where} (noisy patient counts over "
            f"{len(labels)} public candidates, noise s.d. {a.count_sd:.2g}; counts below "
            f"about {3 * (a.count_sd or 0):.0f} are indistinguishable from zero): {items}."
        )
    return f"{body} This answer is {dp}; exact figures are never released."


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
    return _with_text(a, q)


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


def _with_text(a: AggregateAnswer, q: AggregateQuery) -> AggregateAnswer:
    return replace(a, text=_render(a, _describe(q)))


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


# --------------------------------------------------------------------------- federation


def combine(
    answers: Sequence[AggregateAnswer], *, disjoint_patients: bool = False
) -> AggregateAnswer:
    """Sum the hospitals' noisy releases of one query (pure post-processing).

    Each hospital's ledger is charged its own ``curve``. The returned ``curve`` is what the
    *user* (and any one patient) spent: by default the **sum** of the hospitals' curves
    (sequential composition — a patient may be treated at several hospitals, and no shared
    patient identifier lets us rule that out). With ``disjoint_patients=True`` (each patient's
    records live at one hospital only) parallel composition applies: a patient's data enters
    one release only, so the spend is the **max** over hospitals (ρ_max·α).
    """
    if not answers:
        raise ValueError("nothing to combine")
    first = answers[0]
    if any(a.query_key != first.query_key for a in answers):
        raise ValueError("can only combine answers to the same query")
    if any(a.delta != first.delta for a in answers):
        raise ValueError("can only combine answers released at the same delta")
    if disjoint_patients:  # pointwise max: at every α a patient is in one release only
        values = zip(*(a.curve.values for a in answers), strict=True)
        curve = PrivacyCurve(first.curve.orders, tuple(max(v) for v in values))
    else:
        curve = sum((a.curve for a in answers), PrivacyCurve.zero(first.curve.orders))

    def total(xs: Iterable[float | None]) -> float | None:
        vals = list(xs)
        return None if any(v is None for v in vals) else float(sum(vals))  # type: ignore[arg-type]

    def sd(xs: Iterable[float | None]) -> float | None:
        t = total(x * x if x is not None else None for x in xs)
        return None if t is None else math.sqrt(t)

    count = total(a.noisy_count for a in answers)
    noisy_sum = total(a.noisy_sum for a in answers)
    hist = None
    if first.histogram is not None:
        keys = [k for k, _ in first.histogram]
        sums = np.sum([[c for _, c in a.histogram or ()] for a in answers], axis=0)
        hist = tuple((k, int(c)) for k, c in zip(keys, sums, strict=True))
    if first.op == "count":
        value = float(count or 0)
    elif first.op == "sum":
        value = float(noisy_sum or 0)
    elif first.op == "mean":
        assert first.bounds is not None and count is not None and noisy_sum is not None
        value = _clamp(noisy_sum / count, first.bounds) if count >= 1 else sum(first.bounds) / 2
    else:
        value = float(max(c for _, c in hist or ()))
    a = AggregateAnswer(
        op=first.op,
        field=first.field,
        value=value,
        text="",
        curve=curve,
        records_used=sum(a.records_used for a in answers),
        epsilon=max(a.epsilon for a in answers),
        delta=first.delta,
        query_key=first.query_key,
        noisy_count=None if count is None else int(count),
        noisy_sum=noisy_sum,
        count_sd=sd(a.count_sd for a in answers),
        sum_sd=sd(a.sum_sd for a in answers),
        bounds=first.bounds,
        histogram=hist,
        top=first.top,
        hospitals=len(answers),
        disjoint_patients=disjoint_patients,
    )
    q = parse_query(_query_from_key(first.query_key))
    eps_user = curve.epsilon(delta=first.delta)
    rule = (
        "max over hospitals (disjoint patients)"
        if disjoint_patients
        else ("sum over hospitals (patients may overlap)")
    )
    text = _render(a, _describe(q)) + (
        f" Privacy loss to any one patient: ε ≤ {eps_user:.3g} at δ={first.delta:g} ({rule})."
    )
    return replace(a, text=text)


def _query_from_key(key: str) -> dict[str, Any]:
    d = json.loads(key)
    where = {k: d[k] for k in WHERE_KEYS if d.get(k) is not None}
    out: dict[str, Any] = {"op": d["op"], "where": where}
    if d.get("field") is not None:
        out["field"] = d["field"]
    if d.get("bounds") is not None:
        out["bounds"] = list(d["bounds"])
    if d.get("max_per_patient") is not None:
        out["max_per_patient"] = d["max_per_patient"]
    return out

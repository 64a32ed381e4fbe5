"""A clinical QA set with ground truth from a hospital's structured (FHIR) records, and its scoring.

Questions come from six templates, filled with the hospital's most common diagnoses and
medications (entities whose public display name the lexicon maps back to the same key):

| template | question | ground truth (exact, from the FHIR cohort) | correct when |
|---|---|---|---|
| ``top_dx_on_drug`` | Which diagnosis is most common among our patients on {drug}? | diagnosis categories by patient count among patients whose medication names contain {drug} | the first diagnosis named (other than ones in the question) is within 5 % of the top count |
| ``top_med_for_dx`` | Which medication is most often prescribed for {dx} in our patients? | medications by patient count among patients with a code in {dx}'s ICD-10 category | the first medication named is within 5 % of the top count |
| ``count_dx`` | How many of our patients have {dx}? | patients with a code in the category | the first number is within max(10, 10 %) of the truth |
| ``count_drug_over_65`` | How many of our patients on {drug} are over 65? | patients on {drug} aged ≥ 66 | the first number is within max(10, 10 %) |
| ``mean_age_dx`` | What is the mean age of our patients with {dx}? | mean age of those patients | the first number is within 3 years |
| ``compare_dx`` | Which is more common among our patients: {a} or {b}? | the one with more patients (pairs differ by ≥ 15 %) | the first of the two named is the more common |

Every answer is scored from its **text** by the same parser, whatever produced it, so the
record-free model, RAG, per-token DP and the DP routes are compared on equal terms. Numbers
that also appear in the question (e.g. "65") are skipped when reading a numeric answer.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import mean
from typing import Literal

from fedllm.services.node_worker.aggregate import histogram_keys
from fedllm.services.node_worker.cohort import Cohort, PatientRecord
from fedllm.services.node_worker.entities import EntityKind, display_name, find_entities

Template = Literal[
    "top_dx_on_drug",
    "top_med_for_dx",
    "count_dx",
    "count_drug_over_65",
    "mean_age_dx",
    "compare_dx",
]
TEMPLATES: tuple[Template, ...] = (
    "top_dx_on_drug",
    "top_med_for_dx",
    "count_dx",
    "count_drug_over_65",
    "mean_age_dx",
    "compare_dx",
)
NEAR_TIE = 0.05
COUNT_TOLERANCE = (10, 0.10)  # absolute, relative: the larger applies
AGE_TOLERANCE = 3.0
COMPARE_MARGIN = 0.15
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:,\d{3})*(?:\.\d+)?)")


@dataclass(frozen=True, slots=True)
class Question:
    """One benchmark question with its exact answer."""

    qid: str
    template: Template
    text: str
    kind: Literal["entity", "count", "age", "compare"]
    entity_kind: EntityKind | None = None
    accept: frozenset[str] = frozenset()  # entity / compare: keys scored correct
    exclude: frozenset[str] = frozenset()  # entities named in the question
    candidates: tuple[str, ...] = ()  # compare: the two keys
    truth: float | str = ""  # the exact answer (number, or the top key)


def _has_dx(p: PatientRecord, cat: str) -> bool:
    return any(d.code.upper().startswith(cat) for d in p.diagnoses)


def _on_drug(p: PatientRecord, drug: str) -> bool:
    return any(drug in m.name.casefold() for m in p.medications)


def _round_trips(key: str, kind: EntityKind) -> bool:
    found = [e.key for e in find_entities(display_name(key, kind), kind)]
    return found[:1] == [key]


def _accept(counts: Counter[str]) -> tuple[frozenset[str], str]:
    top_key, top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    return frozenset(k for k, c in counts.items() if c >= (1 - NEAR_TIE) * top), top_key


def build_questions(
    cohort: Cohort, *, per_template: int = 12, min_patients: int = 20
) -> list[Question]:
    """Up to ``per_template`` questions per template, deterministic for a cohort, about
    diagnoses and medications at least ``min_patients`` patients have."""
    patients = list(cohort)
    dx_counts: Counter[str] = Counter()
    rx_counts: Counter[str] = Counter()
    for p in patients:
        dx_counts.update(histogram_keys(p, "diagnosis"))
        rx_counts.update(histogram_keys(p, "medication"))
    dxs = [
        k for k, c in dx_counts.most_common() if c >= min_patients and _round_trips(k, "diagnosis")
    ]
    rxs = [
        k for k, c in rx_counts.most_common() if c >= min_patients and _round_trips(k, "medication")
    ]
    out: list[Question] = []

    for drug in rxs[:per_template]:
        group = [p for p in patients if _on_drug(p, drug)]
        counts = Counter(k for p in group for k in histogram_keys(p, "diagnosis"))
        if not counts:
            continue
        accept, top = _accept(counts)
        name = display_name(drug, "medication").lower()
        out.append(
            Question(
                f"top_dx_on_drug:{drug}",
                "top_dx_on_drug",
                f"Which diagnosis is most common among our patients on {name}?",
                "entity",
                "diagnosis",
                accept,
                frozenset({drug}),
                truth=top,
            )
        )
        over = [p for p in group if p.age is not None and p.age > 65]
        out.append(
            Question(
                f"count_drug_over_65:{drug}",
                "count_drug_over_65",
                f"How many of our patients on {name} are over 65?",
                "count",
                truth=float(len(over)),
            )
        )
    for dx in dxs[:per_template]:
        group = [p for p in patients if _has_dx(p, dx)]
        name = display_name(dx, "diagnosis")
        counts = Counter(k for p in group for k in histogram_keys(p, "medication"))
        if counts:
            accept, top = _accept(counts)
            out.append(
                Question(
                    f"top_med_for_dx:{dx}",
                    "top_med_for_dx",
                    f"Which medication is most often prescribed for {name} in our patients?",
                    "entity",
                    "medication",
                    accept,
                    frozenset({dx}),
                    truth=top,
                )
            )
        out.append(
            Question(
                f"count_dx:{dx}",
                "count_dx",
                f"How many of our patients have {name}?",
                "count",
                truth=float(len(group)),
            )
        )
        ages = [p.age for p in group if p.age is not None]
        if ages:
            out.append(
                Question(
                    f"mean_age_dx:{dx}",
                    "mean_age_dx",
                    f"What is the mean age of our patients with {name}?",
                    "age",
                    truth=float(mean(ages)),
                )
            )
    pairs = 0
    for i, a in enumerate(dxs):
        for b in dxs[i + 1 :]:
            ca, cb = sum(_has_dx(p, a) for p in patients), sum(_has_dx(p, b) for p in patients)
            if pairs >= per_template or abs(ca - cb) < COMPARE_MARGIN * max(ca, cb):
                continue
            first, second = (a, b) if (i + pairs) % 2 == 0 else (b, a)  # winner not always first
            win = a if ca > cb else b
            out.append(
                Question(
                    f"compare_dx:{first}:{second}",
                    "compare_dx",
                    f"Which is more common among our patients: {display_name(first, 'diagnosis')} "
                    f"or {display_name(second, 'diagnosis')}?",
                    "compare",
                    "diagnosis",
                    frozenset({win}),
                    candidates=(first, second),
                    truth=win,
                )
            )
            pairs += 1
    order = {t: i for i, t in enumerate(TEMPLATES)}
    return sorted(out, key=lambda q: (order[q.template], q.qid))


def subset(questions: Sequence[Question], *, per_template: int) -> list[Question]:
    """The first ``per_template`` questions of each template (the ``--quick`` set)."""
    seen: Counter[str] = Counter()
    out = []
    for q in questions:
        if seen[q.template] < per_template:
            out.append(q)
            seen[q.template] += 1
    return out


def first_number(answer: str, question: str) -> float | None:
    """The first number in ``answer`` that does not also appear in ``question``."""
    skip = {m.group(1) for m in _NUMBER.finditer(question)}
    for m in _NUMBER.finditer(answer):
        if m.group(1) not in skip:
            return float(m.group(1).replace(",", ""))
    return None


def score(q: Question, answer: str) -> bool:
    """Whether ``answer`` (any text) answers ``q`` correctly under the fixed rules above."""
    if q.kind == "entity":
        assert q.entity_kind is not None
        for e in find_entities(answer, q.entity_kind):
            if e.key not in q.exclude:
                return e.key in q.accept
        return False
    if q.kind == "compare":
        for e in find_entities(answer, "diagnosis"):
            if e.key in q.candidates:
                return e.key in q.accept
        return False
    x = first_number(answer, q.text)
    if x is None:
        return False
    assert isinstance(q.truth, float)
    if q.kind == "count":
        return abs(x - q.truth) <= max(COUNT_TOLERANCE[0], COUNT_TOLERANCE[1] * q.truth)
    return abs(x - q.truth) <= AGE_TOLERANCE

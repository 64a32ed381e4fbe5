"""A public, deterministic translator from population questions to the aggregate query language.

The question is not patient data; the records are. So reading the question with a small
grammar is free of privacy cost, and when it recognises a population question the answer comes
from a DP aggregate (:mod:`fedllm.services.node_worker.aggregate`) instead of the text path.

Grammar (case-insensitive; entities are matched against the public ICD-10 / RxNorm lexicon of
:mod:`fedllm.services.node_worker.entities`; at most one diagnosis and one medication as filters)::

    count     := "how many" … [filters]                      → {"op": "count"}
    mean      := ("mean" | "average") "age" … [filters]        → {"op": "mean", "field": "age"}
    top       := ("which" | "what") … ("medication" | "drug" | "prescribed" …)
                   … "most" … [filters]                        → histogram of medication
               | ("which" | "what") … ("diagnosis" | "condition" …) … "most" … [filters]
                                                               → histogram of diagnosis
    compare   := ("which" | "what") … "more common" … A "or" B  → histogram of diagnosis (or
                                                                 medication), A vs B read off
    filters   := diagnosis entity | "on" medication entity | ("over" | "older than" | "above") N
               | ("under" | "younger than" | "below") N | "between" N "and" M | "aged" N "or older"
               | "women" | "female" | "men" | "male"

Anything else (or a second diagnosis, an unknown drug) does not translate: ``None``, and the
request falls through to the text path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedllm.services.node_worker.entities import display_name, find_entities

__all__ = ["Translation", "render", "translate"]

Shape = Literal["count", "mean", "top", "compare"]

_HOW_MANY = re.compile(r"\bhow many\b", re.I)
_MEAN_AGE = re.compile(r"\b(mean|average)\s+age\b", re.I)
_WHICH = re.compile(r"\b(which|what)\b", re.I)
_MOST = re.compile(r"\bmost\b", re.I)
_MORE_COMMON = re.compile(r"\bmore (common|frequent|prevalent)\b", re.I)
_MED_WORDS = re.compile(r"\b(medications?|medicines?|drugs?|prescri\w*)\b", re.I)
_DX_WORDS = re.compile(r"\b(diagnos\w*|conditions?|diseases?|comorbidit\w*)\b", re.I)
_OVER = re.compile(r"\b(?:over|older than|above|more than)\s+(\d{1,3})\b", re.I)
_AT_LEAST = re.compile(r"\b(?:aged?\s+)?(\d{1,3})\s*(?:\+|or (?:older|over|above))", re.I)
_UNDER = re.compile(r"\b(?:under|younger than|below|less than)\s+(\d{1,3})\b", re.I)
_BETWEEN = re.compile(r"\bbetween\s+(\d{1,3})\s+and\s+(\d{1,3})\b", re.I)
_FEMALE = re.compile(r"\b(women|woman|female|females)\b", re.I)
_MALE = re.compile(r"\b(men|man|male|males)\b", re.I)


@dataclass(frozen=True, slots=True)
class Translation:
    """An aggregate query for a question, and how to read its answer."""

    query: dict[str, Any]
    shape: Shape
    candidates: tuple[str, ...] = ()  # compare: the two vocabulary keys


def _filters(question: str, named: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
    where: dict[str, Any] = {}
    dx = [k for k, kind in named if kind == "diagnosis"]
    rx = [k for k, kind in named if kind == "medication"]
    if len(dx) > 1 or len(rx) > 1:
        return None  # the query language has one diagnosis and one medication filter
    if dx:
        where["diagnosis"] = dx[0]
    if rx:
        where["medication"] = rx[0]
    if m := _BETWEEN.search(question):
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            return None
        where["age_min"], where["age_max"] = lo, hi
    else:
        if m := _OVER.search(question):
            where["age_min"] = int(m.group(1)) + 1
        elif m := _AT_LEAST.search(question):
            where["age_min"] = int(m.group(1))
        if m := _UNDER.search(question):
            where["age_max"] = int(m.group(1)) - 1
    if any(not 0 <= v <= 150 for k, v in where.items() if k.startswith("age")):
        return None
    if "age_min" in where and "age_max" in where and where["age_min"] > where["age_max"]:
        return None
    female, male = _FEMALE.search(question), _MALE.search(question)
    if female and not male:
        where["sex"] = "F"
    elif male and not female:
        where["sex"] = "M"
    return where


def translate(question: str) -> Translation | None:
    """The aggregate query a population question asks, or ``None`` (falls through to text)."""
    named = list(dict.fromkeys((e.key, e.kind) for e in find_entities(question)))
    if _MORE_COMMON.search(question) and _WHICH.search(question) and len(named) == 2:
        (a, ka), (b, kb) = named
        if ka != kb:
            return None
        query = {"op": "histogram", "field": ka, "top": 50}
        return Translation(query=query, shape="compare", candidates=(a, b))
    where = _filters(question, named)
    if where is None:
        return None
    if _HOW_MANY.search(question):
        return Translation(query={"op": "count", "where": where}, shape="count")
    if _MEAN_AGE.search(question):
        return Translation(query={"op": "mean", "field": "age", "where": where}, shape="mean")
    if _WHICH.search(question) and _MOST.search(question):
        if _DX_WORDS.search(question):
            field = "diagnosis"
        elif _MED_WORDS.search(question):
            field = "medication"
        else:
            return None
        if field in where:  # "most common diagnosis among patients with diabetes": not a filter
            return None
        return Translation(
            query={"op": "histogram", "field": field, "where": where, "top": 3}, shape="top"
        )
    return None


def _pm(x: float | None) -> str:
    return "?" if x is None or not math.isfinite(x) else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def render(t: Translation, answer: Any) -> str:
    """The user-facing text for an :class:`~fedllm.services.node_worker.aggregate.AggregateAnswer`:
    says it comes from DP aggregates and states the noise (± one standard deviation)."""
    dp = (
        f"Answered from differentially private aggregates over this hospital's structured "
        f"records (ε={answer.epsilon:g}, δ={answer.delta:g}); ± is one noise standard "
        f"deviation."
    )
    if t.shape == "count":
        body = f"≈ {max(0, int(answer.value))} ± {_pm(answer.count_sd)} patients."
    elif t.shape == "mean":
        c = max(1, answer.noisy_count or 1)
        lo, hi = answer.bounds
        spread = max(abs(answer.value - lo), abs(hi - answer.value))
        sd = math.sqrt((answer.sum_sd or 0) ** 2 + (spread * (answer.count_sd or 0)) ** 2) / c
        body = (
            f"Mean age ≈ {answer.value:.1f} ± {_pm(sd)} years "
            f"(over ≈ {answer.noisy_count} ± {_pm(answer.count_sd)} patients)."
        )
    elif t.shape == "compare":
        hist = dict(answer.histogram or ())
        (a, ca), (b, cb) = ((k, hist.get(k, 0)) for k in t.candidates)
        kind = t.query["field"]
        winner, loser = (a, b) if ca >= cb else (b, a)
        body = (
            f"{display_name(winner, kind)} is more common than {display_name(loser, kind)}: "
            f"≈ {max(ca, cb)} vs ≈ {min(ca, cb)} patients (± {_pm(answer.count_sd)} each)."
        )
    else:
        kind = t.query["field"]
        ranked = sorted(answer.histogram or (), key=lambda kv: (-kv[1], kv[0]))[:3]
        items = ", ".join(f"{display_name(k, kind)} ≈ {c}" for k, c in ranked)
        plural = {"diagnosis": "diagnoses", "medication": "medications"}.get(kind, f"{kind}s")
        body = f"Most frequent {plural}: {items} patients (± {_pm(answer.count_sd)} each)."
    return f"{body} {dp}"

"""Which mechanism answers a free-text question, chosen from the question alone (public).

1. A population question the translator reads (:mod:`fedllm.services.node_worker.translate`) is
   answered by a DP aggregate over the structured records, with its noise stated.
2. Else a question asking for a clinical entity (:func:`~fedllm.services.node_worker.answer_dp.plan_question`)
   is answered by answer-level DP over the groups' notes.
3. Else ``None``: the caller falls through to per-token DP decoding.

The choice depends on the question text only, so it reveals nothing about the records. Each
route spends at most ``share``·ρ(ε, δ) and returns the curve it spent, which the accountant
commits through the same reservation as any other release.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.rdp import DEFAULT_ORDERS
from fedllm.schemas.records import InferenceRequest
from fedllm.services.node_worker import aggregate
from fedllm.services.node_worker.answer_dp import EntityAnswerer, plan_question
from fedllm.services.node_worker.cohort import load_cohort
from fedllm.services.node_worker.fields import AnswerFields
from fedllm.services.node_worker.records import Note, load_notes
from fedllm.services.node_worker.reservation import reservation_rho
from fedllm.services.node_worker.translate import render, translate

__all__ = ["RoutedAnswer", "TextRoutes"]

Rng = random.Random | np.random.Generator


@dataclass(frozen=True, slots=True)
class RoutedAnswer:
    """A released text answer: which route, the text, the curve spent, records scanned."""

    route: str  # "aggregate" | "entities"
    text: str
    curve: PrivacyCurve
    records_used: int


class TextRoutes:
    """The hospital's two answer-level routes; built once per node (entities lazily)."""

    def __init__(
        self,
        clinosim_dir: Path,
        *,
        key: bytes,
        groups: int,
        notes: Callable[[], list[Note]] | None = None,
    ) -> None:
        """``groups``: m for answer-level DP, from public configuration
        (:func:`~fedllm.services.node_worker.answer_dp.groups_for_population`)."""
        self.clinosim_dir = Path(clinosim_dir)
        self._key = key
        self._notes = notes or (lambda: load_notes(self.clinosim_dir))
        self._groups = groups

    @functools.cached_property
    def entities(self) -> EntityAnswerer:
        return EntityAnswerer(self._notes(), key=self._key, groups=self._groups)

    def applies(self, question: str) -> bool:
        """Whether a route reads ``question`` (public: a function of the question alone)."""
        return translate(question) is not None or plan_question(question) is not None

    def answer(
        self,
        question: str,
        *,
        epsilon: float,
        delta: float,
        rng: Rng,
        rho: float | None = None,
        share: float = 1.0,
        orders: tuple[float, ...] = tuple(DEFAULT_ORDERS),
        routes: tuple[str, ...] = ("aggregate", "entities"),
    ) -> RoutedAnswer | None:
        """The first route in ``routes`` that applies to ``question``, or ``None``. It spends
        ``rho`` (the node's, from the routed request), or when not given ``share`` of what a
        budget ε reserves (:func:`~fedllm.services.node_worker.reservation.reservation_rho`);
        ``epsilon`` is the budget the answer's text states."""
        if not epsilon > 0:
            return None
        if rho is None:
            rho = share * reservation_rho(
                reserved_rho=0.0, epsilon=epsilon, delta=delta, orders=orders
            )
        if "aggregate" in routes and (t := translate(question)) is not None:
            cohort = load_cohort(self.clinosim_dir)
            res = aggregate.answer_on_cohort(
                query=t.query, cohort=cohort, epsilon=epsilon, delta=delta, rng=rng, rho=rho
            )
            return RoutedAnswer("aggregate", render(t, res), res.curve, len(cohort))
        if "entities" in routes and (plan := plan_question(question)) is not None:
            ans = self.entities.answer(
                plan, rho=rho, epsilon=epsilon, delta=delta, rng=rng, orders=orders
            )
            return RoutedAnswer("entities", ans.text, ans.curve, ans.groups)
        return None

    def fields(self, inner: InferenceRequest, **kw: Any) -> AnswerFields | None:
        """InferenceResult fields for a "generate" request a route answers, else ``None``."""
        res = self.answer(str(inner.get("prompt", "")), **kw)
        if res is None:
            return None
        delta = kw["delta"]
        return {
            "status": "ok",
            "reason": "",
            "response": res.text,
            "is_private": True,
            "privacy_cost": res.curve.epsilon(delta=delta),
            "delta": delta,
            "rdp_orders": list(res.curve.orders),
            "rdp_epsilons": list(res.curve.values),
            "tokens": 0,
            "records_used": res.records_used,
        }

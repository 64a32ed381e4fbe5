"""Answer-level DP for free-text questions whose answer is a clinical entity.

"Which medication do our hypertension patients get most?" is answered by spending ε once per
answer, not once per token:

1. **Plan (public).** From the question alone: which kind of entity is asked for (diagnosis or
   medication), which entities condition it ("for hypertension", "on metformin"), and, for
   "A or B?" questions, the two candidates. No records are read.
2. **Per-group votes (private, one function per group).** The hospital's notes are split into
   m disjoint patient groups by the keyed hash of the patient id
   (:func:`fedllm.services.node_worker.records.partition`); m scales with the hospital
   (:func:`groups_for`). Group i looks only at its own notes: the patients whose notes name
   every conditioning entity; among them, each entity of the asked kind is counted once per
   patient; the group names its ≤ K most frequent entities (ties by key). This "draft" is
   entity extraction over the group's own notes against the public ICD-10 / RxNorm lexicon
   (:mod:`fedllm.services.node_worker.entities`) — cheap on a CPU, where an LM draft per group is not.
3. **Release.** The vote histogram over the public vocabulary with exact discrete Gaussian
   noise, L2 sensitivity √(2K) (:mod:`fedllm.privacy.entity_histogram`).
4. **Answer.** Text written from the released ranking and public parameters only.

One patient is in one group, so they change one group's ≤ K entities; every other group's
vote is unaffected (group statistics are never pooled).
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.entity_histogram import release_entity_votes
from fedllm.privacy.rdp import DEFAULT_ORDERS
from fedllm.services.node_worker.cohort import diagnosis_vocabulary, medication_vocabulary
from fedllm.services.node_worker.entities import EntityKind, display_name, find_entities
from fedllm.services.node_worker.records import Note, partition

__all__ = [
    "AnswerPlan",
    "EntityAnswer",
    "EntityAnswerer",
    "groups_for",
    "groups_for_population",
    "plan_question",
]

#: Groups per patient the partition aims for, and the public range of m.
PATIENTS_PER_GROUP = 32
MIN_GROUPS, MAX_GROUPS = 32, 128
#: Entities a group may name (K); the histogram's L2 sensitivity is √(2K).
MAX_ENTITIES = 1
Rng = random.Random | np.random.Generator

#: "which/what [up to 4 words] <entity noun>": the question asks for an entity of that kind.
_ASKS = re.compile(
    r"\b(?:which|what)\b(?:\W+[\w-]+){0,4}?\W+(?:(?P<rx>medications?|medicines?|drugs?)|"
    r"(?P<dx>diagnos[ie]s|conditions?|diseases?|comorbidit(?:y|ies)|disorders?))\b",
    re.I,
)
_WHICH = re.compile(r"\b(which|what)\b", re.I)
_OR = re.compile(r"\bor\b", re.I)


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    """What a question asks for, read from the question text only (public)."""

    kind: EntityKind
    given: tuple[tuple[str, EntityKind], ...]  # conditioning entities (key, kind)
    candidates: tuple[str, ...] = ()  # "A or B?": the keys to choose between


def plan_question(question: str) -> AnswerPlan | None:
    """The entity plan of a question, or ``None`` if it does not ask for an entity."""
    if not _WHICH.search(question):
        return None
    named = list(dict.fromkeys((e.key, e.kind) for e in find_entities(question)))
    if len(named) == 2 and named[0][1] == named[1][1] and _OR.search(question):
        return AnswerPlan(kind=named[0][1], given=(), candidates=(named[0][0], named[1][0]))
    m = _ASKS.search(question)
    if m is None:
        return None
    kind: EntityKind = "medication" if m.group("rx") else "diagnosis"
    return AnswerPlan(kind=kind, given=tuple(named))


def groups_for(n_patients: int) -> int:
    """m for a hospital of about ``n_patients``: ~32 patients a group, in [32, 128].

    ``n_patients`` must be a **public** figure fixed in advance (the configured size), never a
    count of the records: m changes the whole partition, so if it moved with one patient the
    "one patient changes one group" argument would fail.
    """
    return max(MIN_GROUPS, min(MAX_GROUPS, n_patients // PATIENTS_PER_GROUP))


def groups_for_population(population: int) -> int:
    """m from a hospital's configured clinosim catchment population (public; about half of it
    become patients with records)."""
    return groups_for(population // 2)


@functools.cache
def _vocab(kind: EntityKind) -> tuple[str, ...]:
    entries = diagnosis_vocabulary() if kind == "diagnosis" else medication_vocabulary()
    return tuple(e.key for e in entries)


@dataclass(frozen=True, slots=True)
class EntityAnswer:
    """A released answer: text, the ranked entities (keys, noisy votes), σ and the spend."""

    text: str
    ranked: tuple[tuple[str, int], ...]
    sigma: float
    groups: int
    curve: PrivacyCurve
    kind: EntityKind


class EntityAnswerer:
    """The hospital's notes in m groups, with each note's public-vocabulary entities extracted
    once (per group, from that group's notes only)."""

    def __init__(self, notes: Sequence[Note], *, key: bytes, groups: int) -> None:
        if groups < 1:
            raise ValueError(f"groups must be >= 1; got {groups}")
        self.groups = groups  # public: never derived from the notes
        # per group: patient → (diagnosis keys, medication keys) named in their notes
        self._patients: list[dict[str, tuple[set[str], set[str]]]] = []
        for g in partition(notes, key=key, groups=self.groups):
            by_patient: dict[str, tuple[set[str], set[str]]] = {}
            for note in g:
                dx, rx = by_patient.setdefault(note.patient_id, (set(), set()))
                for e in find_entities(note.text):
                    (dx if e.kind == "diagnosis" else rx).add(e.key)
            self._patients.append(by_patient)

    def group_vote(self, group: int, plan: AnswerPlan, *, max_entities: int) -> list[str]:
        """Group ``group``'s ≤ K entities for ``plan``, from its own notes only."""
        counts: Counter[str] = Counter()
        for dx, rx in self._patients[group].values():
            named = dx | rx
            if not all(k in named for k, _ in plan.given):
                continue
            have = dx if plan.kind == "diagnosis" else rx
            if plan.candidates:
                counts.update(k for k in plan.candidates if k in have)
            else:
                counts.update(k for k in have if (k, plan.kind) not in plan.given)
        if plan.candidates and len(counts) == 2 and len(set(counts.values())) == 1:
            return []  # a tie between the two candidates: no vote
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return [k for k, _ in ranked[:max_entities]]

    def answer(
        self,
        plan: AnswerPlan,
        *,
        rho: float,
        epsilon: float,
        delta: float,
        rng: Rng,
        max_entities: int = MAX_ENTITIES,
        orders: Sequence[float] = DEFAULT_ORDERS,
        top: int = 3,
    ) -> EntityAnswer:
        """Release the noisy vote histogram under ρ-zCDP and write the answer from it."""
        vocab = _vocab(plan.kind)
        index = {k: i for i, k in enumerate(vocab)}
        votes = [
            [index[k] for k in self.group_vote(g, plan, max_entities=max_entities) if k in index]
            for g in range(self.groups)
        ]
        rel = release_entity_votes(
            votes,
            vocab_size=len(vocab),
            max_entities=max_entities,
            rho=rho,
            rng=rng,
            orders=orders,
        )
        if plan.candidates:  # post-processing: rank only the two named candidates
            cands = [(k, int(rel.counts[index[k]])) for k in plan.candidates if k in index]
            ranked = tuple(sorted(cands, key=lambda kv: (-kv[1], kv[0])))
        else:
            ranked = tuple((vocab[i], c) for i, c in rel.ranked(top))
        text = render(
            plan, ranked, sigma=rel.sigma, groups=self.groups, epsilon=epsilon, delta=delta
        )
        return EntityAnswer(
            text=text,
            ranked=ranked,
            sigma=rel.sigma,
            groups=self.groups,
            curve=rel.curve,
            kind=plan.kind,
        )


def render(
    plan: AnswerPlan,
    ranked: Sequence[tuple[str, int]],
    *,
    sigma: float,
    groups: int,
    epsilon: float,
    delta: float,
) -> str:
    """The answer text: a function of the released ranking and public parameters only."""
    names = [display_name(k, plan.kind) for k, _ in ranked]
    noun = "diagnosis" if plan.kind == "diagnosis" else "medication"
    if plan.candidates:
        body = (
            f"{names[0]} is more common than {names[1]} in this hospital's notes "
            f"(noisy group votes {ranked[0][1]} vs {ranked[1][1]})."
        )
    else:
        given = " and ".join(
            ("on " if kind == "medication" else "with ") + display_name(k, kind)
            for k, kind in plan.given
        )
        among = f" among patients {given}" if given else ""
        rest = f", followed by {', '.join(names[1:])}" if len(names) > 1 else ""
        body = (
            f"The most frequent {noun}{among} in this hospital's notes is {names[0]}{rest} "
            f"(noisy votes of {groups} patient groups: "
            f"{', '.join(str(c) for _, c in ranked)})."
        )
    return (
        f"{body} Answer-level differential privacy: one release over {groups} groups, "
        f"noise s.d. {sigma:.2g}, ε={epsilon:g}, δ={delta:g}."
    )

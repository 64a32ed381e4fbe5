"""Empirical privacy audit of answer-level DP (entity votes of disjoint patient groups).

Worst-case neighbours: a canary patient whose presence flips their group's vote from one
entity to another (|S Δ S'| = 2K with K = 1, the full L2 sensitivity √2). The votes are computed
by the real :class:`EntityAnswerer` over notes; the release is the real
:func:`release_entity_votes` on the two coordinates the test looks at (coordinates are noised
independently, so this is the exact marginal of the full release). A threshold on
count[canary's entity] − count[other entity] is picked on a selection split and evaluated on
fresh trials; with Clopper–Pearson bounds at 95 %, ε_lb = log((TPR_lo − δ)/FPR_hi) must stay
below the claimed ε, and a variant with 10× too little noise must be caught.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy.stats import beta

from fedllm.privacy.entity_histogram import release_entity_votes
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker.answer_dp import AnswerPlan, EntityAnswerer
from fedllm.services.node_worker.records import Note, group_of

pytestmark = [pytest.mark.privacy_audit, pytest.mark.slow]

CLAIMED_EPSILON, DELTA, CONFIDENCE = 1.0, 1e-5, 0.95
SELECTION, EVALUATION = 4_000, 20_000
KEY, GROUPS = b"audit-key".ljust(32, b"."), 32
PLAN = AnswerPlan(kind="medication", given=(("I10", "diagnosis"),))
VOCAB = ("acetaminophen", "amlodipine")  # the two coordinates the distinguisher reads


def worlds() -> tuple[list[list[int]], list[list[int]]]:
    """Votes (indices into VOCAB) without and with the canary."""
    base = [
        Note(f"n{i}", f"P{i}", "Essential hypertension; continue amlodipine.") for i in range(40)
    ]
    sizes = [
        sum(group_of(n.patient_id, key=KEY, groups=GROUPS) == g for n in base)
        for g in range(GROUPS)
    ]
    target = sizes.index(1)  # a group with one amlodipine patient: the canary ties and wins
    canary = next(
        f"C{i}" for i in range(10_000) if group_of(f"C{i}", key=KEY, groups=GROUPS) == target
    )
    with_canary = [*base, Note("c", canary, "Essential hypertension; on acetaminophen.")]

    def votes(notes: list[Note]) -> list[list[int]]:
        a = EntityAnswerer(notes, key=KEY, groups=GROUPS)
        return [
            [VOCAB.index(k) for k in a.group_vote(g, PLAN, max_entities=1) if k in VOCAB]
            for g in range(GROUPS)
        ]

    out, inn = votes(base), votes(with_canary)
    assert sum(a != b for a, b in zip(out, inn, strict=True)) == 1  # one group flipped
    return out, inn


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    a = 1 - CONFIDENCE
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def eps_lb(s_in: np.ndarray, s_out: np.ndarray, t: int) -> float:
    tpr_lo, _ = clopper_pearson(int((s_in >= t).sum()), len(s_in))
    _, fpr_hi = clopper_pearson(int((s_out >= t).sum()), len(s_out))
    return 0.0 if tpr_lo <= DELTA else max(0.0, math.log((tpr_lo - DELTA) / fpr_hi))


def audit(rho: float, seed: int) -> float:
    rng = random.Random(seed)
    out, inn = worlds()

    def stats(votes: list[list[int]], n: int) -> np.ndarray:
        res = [
            release_entity_votes(votes, vocab_size=2, max_entities=1, rho=rho, rng=rng)
            for _ in range(n)
        ]
        return np.array([int(r.counts[0]) - int(r.counts[1]) for r in res])

    sel_in, sel_out = stats(inn, SELECTION), stats(out, SELECTION)
    best = max(
        range(int(sel_out.min()), int(sel_in.max()) + 2), key=lambda t: eps_lb(sel_in, sel_out, t)
    )
    return eps_lb(stats(inn, EVALUATION), stats(out, EVALUATION), best)


def test_audit_of_entity_release_respects_claimed_epsilon() -> None:
    rho = rho_for_epsilon(epsilon=CLAIMED_EPSILON, delta=DELTA)
    assert 0.0 <= audit(rho, seed=7) <= CLAIMED_EPSILON


def test_audit_catches_ten_times_too_little_noise() -> None:
    rho = rho_for_epsilon(epsilon=CLAIMED_EPSILON, delta=DELTA)
    assert audit(100 * rho, seed=8) > CLAIMED_EPSILON  # σ/10

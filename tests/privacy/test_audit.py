"""Empirical privacy audit of the released noisy count (one patient in vs out).

The released mechanism is ``noisy_count`` of "records matching a predicate" over a record set.
Neighbouring record sets differ by one patient who matches, so the true counts are c and c + 1.
A threshold test ("output ≥ T ⇒ the patient is in") gives TPR/FPR; any (ε, δ)-DP mechanism
satisfies TPR ≤ e^ε·FPR + δ, so with Clopper–Pearson bounds at 95 %
ε_lb = log((TPR_lo − δ)/FPR_hi) is a lower bound on the true ε (with 95 % confidence).
The threshold is chosen on a separate selection split and then evaluated on fresh trials.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
from scipy.stats import beta

from fedllm.privacy.mechanisms import DiscreteGaussianMechanism, noisy_count

CLAIMED_EPSILON = 1.0
DELTA = 1e-5
SELECTION_TRIALS = 4_000
EVALUATION_TRIALS = 20_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Record:
    patient_id: int
    age: int
    diagnosis: str


def matches(record: Record) -> bool:
    return record.age >= 65 and record.diagnosis == "I50"  # heart failure, 65+


def make_records(seed: int) -> list[Record]:
    rng = random.Random(seed)
    return [
        Record(i, rng.randint(18, 95), rng.choice(["I50", "E11", "J44", "I10"])) for i in range(500)
    ]


def release(records: list[Record], *, sigma: float, rng: random.Random, trials: int) -> np.ndarray:
    """``trials`` independent runs of the mechanism under audit: the discrete-Gaussian noisy
    count of matching records (the exact count is deterministic, so it is computed once)."""
    count = sum(matches(r) for r in records)
    return np.array([noisy_count(value=count, sigma=sigma, rng=rng) for _ in range(trials)])


def clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    a = 1 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(outs_in: np.ndarray, outs_out: np.ndarray, threshold: int) -> float:
    n_in, n_out = len(outs_in), len(outs_out)
    tpr_lo, _ = clopper_pearson(int((outs_in >= threshold).sum()), n_in, CONFIDENCE)
    _, fpr_hi = clopper_pearson(int((outs_out >= threshold).sum()), n_out, CONFIDENCE)
    if tpr_lo - DELTA <= 0:
        return 0.0
    return max(0.0, math.log((tpr_lo - DELTA) / fpr_hi))


def audit(sigma: float, seed: int) -> float:
    """ε lower bound for the released count with noise σ."""
    rng = random.Random(seed)
    records = make_records(seed)
    target = Record(10_000, 80, "I50")
    assert matches(target)
    world_out, world_in = records, [*records, target]

    def run(world: list[Record], n: int) -> np.ndarray:
        return release(world, sigma=sigma, rng=rng, trials=n)

    sel_in, sel_out = run(world_in, SELECTION_TRIALS), run(world_out, SELECTION_TRIALS)
    thresholds = range(int(sel_out.min()), int(sel_in.max()) + 2)
    best = max(thresholds, key=lambda t: epsilon_lower_bound(sel_in, sel_out, t))
    ev_in, ev_out = run(world_in, EVALUATION_TRIALS), run(world_out, EVALUATION_TRIALS)
    return epsilon_lower_bound(ev_in, ev_out, best)


@pytest.mark.slow
def test_audit_of_calibrated_noisy_count_respects_claimed_epsilon() -> None:
    mech = DiscreteGaussianMechanism.calibrate(epsilon=CLAIMED_EPSILON, delta=DELTA)
    assert mech.epsilon(delta=DELTA) <= CLAIMED_EPSILON
    eps_lb = audit(mech.sigma, seed=2024)
    assert 0.0 <= eps_lb <= CLAIMED_EPSILON


@pytest.mark.slow
def test_audit_detects_mechanism_with_ten_times_too_little_noise() -> None:
    mech = DiscreteGaussianMechanism.calibrate(epsilon=CLAIMED_EPSILON, delta=DELTA)
    eps_lb = audit(mech.sigma / 10, seed=2025)
    assert eps_lb > CLAIMED_EPSILON

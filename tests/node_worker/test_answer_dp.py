"""Answer-level DP over entity votes of disjoint patient groups."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant

from fedllm.common.config import Settings
from fedllm.privacy.entity_histogram import entity_sensitivity_sq, release_entity_votes
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker.answer_dp import (
    AnswerPlan,
    EntityAnswerer,
    groups_for,
    groups_for_population,
    plan_question,
)
from fedllm.services.node_worker.records import Note, group_of
from tests.node_worker.test_engine import routed

if TYPE_CHECKING:  # torch: imported by the tests that build an engine, not at collection
    from fedllm.services.node_worker.model import LoadedModel

KEY = b"k" * 32


def notes_for(pid: str, *texts: str) -> list[Note]:
    return [Note(f"{pid}-n{i}", pid, t) for i, t in enumerate(texts)]


def hospital(n: int) -> list[Note]:
    """n patients: hypertension on amlodipine (2 in 3) or on candesartan (1 in 3)."""
    out: list[Note] = []
    for i in range(n):
        drug = "candesartan" if i % 3 == 0 else "amlodipine"
        out += notes_for(
            f"P{i}",
            f"Assessment: Essential hypertension. Plan: continue {drug}.",
            "Follow-up visit, stable.",
        )
    return out


def test_plan_reads_the_question_only() -> None:
    assert plan_question("Which medications are given for hypertension?") == AnswerPlan(
        kind="medication", given=(("I10", "diagnosis"),)
    )
    assert plan_question("What is the most common diagnosis in patients on warfarin?") == (
        AnswerPlan(kind="diagnosis", given=(("warfarin", "medication"),))
    )
    assert plan_question("Which is more common, asthma or COPD?") == AnswerPlan(
        kind="diagnosis", given=(), candidates=("J45", "J44")
    )
    assert plan_question("Which patients take metformin?") is None
    assert plan_question("What is hypertension?") is None


def test_group_count_scales_with_the_hospital_within_public_bounds() -> None:
    assert groups_for(100) == 32 and groups_for(2_000) == 62 and groups_for(100_000) == 128
    assert groups_for_population(4_000) == 62 and groups_for_population(400) == 32


def test_one_patient_changes_at_most_one_groups_vote() -> None:
    base = hospital(40)  # 40 patients in 32 groups: some groups are empty
    plan = AnswerPlan(kind="medication", given=(("I10", "diagnosis"),))
    before = EntityAnswerer(base, key=KEY, groups=32)
    used = {group_of(n.patient_id, key=KEY, groups=32) for n in base}
    canary = next(
        f"CANARY-{i}"
        for i in range(1000)
        if group_of(f"CANARY-{i}", key=KEY, groups=32) not in used
    )
    after = EntityAnswerer(
        base + notes_for(canary, "Essential hypertension; on warfarin."), key=KEY, groups=32
    )
    changed = [
        i
        for i in range(32)
        if before.group_vote(i, plan, max_entities=1) != after.group_vote(i, plan, max_entities=1)
    ]
    g = group_of(canary, key=KEY, groups=32)
    assert changed == [g]
    assert after.group_vote(g, plan, max_entities=1) == ["warfarin"]


def test_votes_are_clipped_to_k_and_the_release_refuses_more() -> None:
    a = EntityAnswerer(hospital(200), key=KEY, groups=32)
    plan = AnswerPlan(kind="medication", given=())
    assert all(len(a.group_vote(i, plan, max_entities=1)) <= 1 for i in range(32))
    with pytest.raises(ValueError, match="K = 1"):
        release_entity_votes([[0, 1]], vocab_size=3, max_entities=1, rho=0.1, rng=random.Random(0))


@pytest.mark.parametrize(("k", "epsilon"), [(1, 1.0), (3, 0.3), (8, 3.0)])
def test_noise_matches_sensitivity_sqrt_2k_against_dp_accounting(k: int, epsilon: float) -> None:
    rho = rho_for_epsilon(epsilon=epsilon, delta=1e-5)
    rel = release_entity_votes(
        [[0]] * 10, vocab_size=5, max_entities=k, rho=rho, rng=random.Random(0)
    )
    assert entity_sensitivity_sq(max_entities=k) == 2 * k
    assert rel.sigma == pytest.approx((k / rho) ** 0.5, rel=1e-9)
    # independent reference: a Gaussian of noise multiplier σ/Δ₂ with Δ₂ = √(2K)
    acc = RdpAccountant(orders=list(DEFAULT_ORDERS))
    acc.compose(GaussianDpEvent(noise_multiplier=rel.sigma / (2 * k) ** 0.5))
    assert acc.get_epsilon(1e-5) <= epsilon + 1e-9
    assert rel.curve.epsilon(delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_release_carries_the_majority_entity_at_moderate_epsilon() -> None:
    a = EntityAnswerer(hospital(2_000), key=KEY, groups=groups_for_population(4_000))
    assert a.groups == 62
    plan = plan_question("Which medication is most often given for hypertension?")
    assert plan is not None
    rho = rho_for_epsilon(epsilon=1.0, delta=1e-5)
    wins = sum(
        a.answer(plan, rho=rho, epsilon=1.0, delta=1e-5, rng=random.Random(s)).ranked[0][0]
        == "amlodipine"
        for s in range(20)
    )
    assert wins >= 18
    ans = a.answer(plan, rho=rho, epsilon=1.0, delta=1e-5, rng=random.Random(0))
    assert "Amlodipine" in ans.text and "ε=1" in ans.text
    assert ans.curve.epsilon(delta=1e-5) <= 1.0 + 1e-9


def test_noise_is_added_to_every_vocabulary_entry() -> None:
    rel = release_entity_votes(
        [[]] * 4, vocab_size=200, max_entities=1, rho=0.01, rng=random.Random(5)
    )
    assert np.count_nonzero(rel.counts) > 150  # nothing voted, yet counts are noisy


def test_engine_routes_population_and_entity_questions(
    hospital_data_dir: Path, tiny: LoadedModel
) -> None:
    from fedllm.services.node_worker.answering import Engine

    eng = Engine(
        Settings(data_dir=hospital_data_dir), "st_mary", model=tiny, groups=4, rng=random.Random(3)
    )
    out = eng.answer(routed(prompt="How many of our patients are over 40?", epsilon=1.0))
    assert out["status"] == "ok" and out["tokens"] == 0 and out["is_private"] is True
    assert "differentially private aggregates" in out["response"] and "±" in out["response"]
    assert 0 < out["privacy_cost"] <= 1.0 + 1e-9
    out = eng.answer(routed(prompt="Which medications are given for hypertension?", epsilon=1.0))
    assert out["tokens"] == 0 and "Answer-level differential privacy" in out["response"]
    out = eng.answer(routed(prompt="Which patients take metformin?", epsilon=5.0))
    assert out["tokens"] > 0  # not a population or entity question: per-token decoding
    off = Engine(
        Settings(data_dir=hospital_data_dir, answer_routes=False),
        "st_mary",
        model=tiny,
        groups=4,
        rng=random.Random(3),
    )
    assert off.answer(routed(prompt="How many of our patients are over 40?"))["tokens"] > 0

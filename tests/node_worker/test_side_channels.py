"""Issue #11, item 1-2: what leaves the node depends on the records only through the DP release.

Neighbouring data sets differ by one person. The public row's logits must be bit-identical, the
groups the person is not in must vote identically, every group prompt has one public length,
and the vote maths (sensitivity, clipping, temperature, SVT noise) matches its analysis.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm.common.config import Settings
from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker import dp_decode as dpd
from fedllm.services.node_worker.answering import Engine
from fedllm.services.node_worker.dp_decode import (
    BatchedDecoder,
    DPDecodeConfig,
    NonFiniteVotes,
    SplitDecoder,
    calibrate,
    clip_votes,
)
from fedllm.services.node_worker.model import LoadedModel
from fedllm.services.node_worker.records import HospitalRecords, group_of, person_of
from tests.node_worker.test_engine import routed

QUESTION = "Which patients had chest pain or hypertension?"


@pytest.fixture
def engine(hospital_data_dir: Path, tiny: LoadedModel) -> Engine:
    return Engine(
        Settings(data_dir=hospital_data_dir, answer_routes=False),
        "st_mary",
        model=tiny,
        groups=4,
        rng=random.Random(1),
    )


def _logits(engine: Engine, records: HospitalRecords) -> tuple[torch.Tensor, torch.Tensor]:
    contexts = records.retrieve(QUESTION, per_group=1)
    prompts = [engine.encode(QUESTION, c) for c in contexts]
    dec = BatchedDecoder(engine.lm.model, device=engine.lm.device, pad_id=0)
    return SplitDecoder(dec).prefill(engine.encode(QUESTION, None), prompts)


def test_group_prompts_have_one_public_length(engine: Engine) -> None:
    contexts = engine.records.retrieve(QUESTION, per_group=1)
    lengths = {len(engine.encode(QUESTION, c)) for c in contexts}
    lengths.add(len(engine.encode(QUESTION, [])))  # nothing matched: filler
    assert len(lengths) == 1


def test_public_prompt_holds_no_record(engine: Engine, tiny: LoadedModel) -> None:
    empty = HospitalRecords([], key=b"k" * 32, groups=4)
    assert all(c == [] for c in empty.retrieve(QUESTION, per_group=1))
    public = engine.encode(QUESTION, None)
    for notes in engine.records.partition:
        for n in notes:
            assert n.text[:40] not in tiny.tokenizer.decode(public)


def test_neighbouring_datasets_public_bit_identical_other_groups_identical(
    engine: Engine,
) -> None:
    notes = [n for g in engine.records.partition for n in g]
    key = b"k" * 32
    full = HospitalRecords(notes, key=key, groups=4)
    pub_full, grp_full = _logits(engine, full)
    hits = full.retrieve(QUESTION, per_group=1)
    persons = sorted({person_of(n.patient_id) for g in hits for n in g})
    assert persons, "the question must match some note"
    cand = torch.topk(pub_full, k=32).indices
    votes_full = dpd._votes(grp_full, cand, temperature=1.0, granularity=1000)
    for person in persons[:3]:
        less = HospitalRecords(
            [n for n in notes if person_of(n.patient_id) != person], key=key, groups=4
        )
        pub, grp = _logits(engine, less)
        assert torch.equal(pub, pub_full)  # bit-identical
        votes = dpd._votes(grp, cand, temperature=1.0, granularity=1000)
        mine = group_of(person, key=key, groups=4)
        for g in range(4):
            if g != mine:
                assert torch.equal(grp[g], grp_full[g])
                assert np.array_equal(votes[g], votes_full[g])


def test_public_row_runs_alone_and_groups_in_one_fixed_shape(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes: list[list[int]] = []
    real = BatchedDecoder.prefill

    def spy(self: BatchedDecoder, prompts):  # noqa: ANN001
        shapes.append([len(p) for p in prompts])
        return real(self, prompts)

    monkeypatch.setattr(BatchedDecoder, "prefill", spy)
    out = engine.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))
    assert out["status"] == "ok"
    assert len(shapes) == 2
    public, groups = sorted(shapes, key=len)
    assert len(public) == 1 and len(groups) == 4 and len(set(groups)) == 1


def test_retrieval_statistics_are_per_group(engine: Engine) -> None:
    """Removing a person re-scores only their own group (BM25 statistics from the group)."""
    notes = [n for g in engine.records.partition for n in g]
    key = b"k" * 32
    full = HospitalRecords(notes, key=key, groups=4)
    ref = [idx.scores(QUESTION) for idx in full.indexes]
    for person in sorted({person_of(n.patient_id) for n in notes})[:6]:
        less = HospitalRecords(
            [n for n in notes if person_of(n.patient_id) != person], key=key, groups=4
        )
        mine = group_of(person, key=key, groups=4)
        for g in range(4):
            if g != mine:
                assert less.indexes[g].scores(QUESTION) == ref[g]


def test_linked_records_share_a_group() -> None:
    for i in range(50):
        mother, baby = f"POP-{i:06d}", f"POP-{i:06d}-BABY"
        assert person_of(baby) == mother
        assert group_of(baby, key=b"k" * 32, groups=8) == group_of(mother, key=b"k" * 32, groups=8)


# --------------------------------------------------------------------------- vote maths


def test_vote_sensitivity_covers_the_worst_neighbour() -> None:
    """Replacing one group's vote moves the histogram by at most the calibrated Δ₂ = √2·g; the
    one-hot swap attains it, so Δ₂ = g would under-noise."""
    g = 1000
    cal = calibrate(rho=0.1, groups=4, config=DPDecodeConfig(granularity=g))
    assert cal is not None
    cand = torch.arange(5)
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in (0.0, 0.05, 1.0, 2.0):
        for _ in range(50):
            a = torch.tensor(rng.normal(size=(1, 5)) * 20)
            b = torch.tensor(rng.normal(size=(1, 5)) * 20)
            va = dpd._votes(a, cand, temperature=t, granularity=g)
            vb = dpd._votes(b, cand, temperature=t, granularity=g)
            worst = max(worst, float(np.linalg.norm(va - vb)))
    assert worst <= cal.sensitivity + 1e-9
    assert worst >= math.sqrt(2) * g - 1e-9  # one-hot swaps reach √2·g
    # and the token's RDP is the Gaussian curve at that sensitivity
    np.testing.assert_allclose(
        cal.token_rdp(DEFAULT_ORDERS),
        np.asarray(DEFAULT_ORDERS) * (math.sqrt(2) * g) ** 2 / (2 * cal.sigma**2),
        rtol=1e-12,
    )


def test_votes_are_clipped_to_l1_g() -> None:
    v = clip_votes(np.array([[5000, 0, 0], [600, 600, 600], [-5, 3, 2], [10, 20, 30]]), 1000)
    assert np.all(v >= 0) and np.all(v.sum(axis=1) <= 1000)
    assert v[3].tolist() == [10, 20, 30]  # within bounds: untouched
    rows = np.random.default_rng(1).integers(-3000, 3000, size=(200, 7))
    assert np.all(clip_votes(rows, 1000).sum(axis=1) <= 1000)


def test_votes_fail_closed_on_non_finite() -> None:
    cand = torch.arange(3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteVotes):
            dpd._votes(torch.tensor([[0.0, bad, 1.0]]), cand, temperature=1.0, granularity=10)
    # Extreme but finite logits at the smallest temperature: stable, valid votes.
    v = dpd._votes(torch.tensor([[3e38, -3e38, 0.0]]), cand, temperature=0.05, granularity=10)
    assert v.tolist() == [[10, 0, 0]]


@pytest.mark.parametrize("temperature", [1e-307, 0.01, 2.5, 3.0, float("nan"), -1.0])
def test_temperature_outside_public_range_fails_closed_and_charged(
    engine: Engine, temperature: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.records, "retrieve", lambda *a, **k: pytest.fail("records read"))
    req = routed(prompt=QUESTION, epsilon=1.0)
    req["request"]["temperature"] = temperature
    out = engine.answer(req)
    assert out["status"] == "failed" and "temperature" in out["reason"]
    rho = rho_for_epsilon(epsilon=1.0, delta=1e-5)
    np.testing.assert_allclose(out["rdp_epsilons"], rho * np.asarray(DEFAULT_ORDERS))
    assert out["privacy_cost"] > 0


@pytest.mark.parametrize("temperature", [0.0, 0.05, 1.0, 2.0])
def test_temperature_in_public_range_is_accepted(engine: Engine, temperature: float) -> None:
    req = routed(prompt=QUESTION, epsilon=1.0, max_tokens=2)
    req["request"]["temperature"] = temperature
    assert engine.answer(req)["status"] == "ok"


def test_non_finite_logits_fail_closed_and_charge(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_prefill(self: SplitDecoder, public_prompt, group_prompts):  # noqa: ANN001
        pub = torch.zeros(engine.lm.model.config.vocab_size)
        return pub, torch.full((len(group_prompts), pub.shape[0]), float("nan"))

    monkeypatch.setattr(SplitDecoder, "prefill", nan_prefill)
    cfg = DPDecodeConfig(use_svt=False)
    monkeypatch.setattr(engine, "config", cfg)
    out = engine.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=2))
    assert out["status"] == "failed" and "fail" in out["reason"]
    rho = rho_for_epsilon(epsilon=1.0, delta=1e-5)
    np.testing.assert_allclose(out["rdp_epsilons"], rho * np.asarray(DEFAULT_ORDERS))


def test_svt_noise_scales_match_lyu_su_li(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alg. 1 of Lyu, Su & Li (c = 1, Δ = g): threshold noise Lap(2Δ/ε), query noise Lap(4Δ/ε)."""
    scales: list[float] = []
    real = dpd.sample_discrete_laplace

    def spy(*, scale, size, rng):  # noqa: ANN001
        scales.append(scale)
        return real(scale=scale, size=size, rng=rng)

    monkeypatch.setattr(dpd, "sample_discrete_laplace", spy)
    tok = tiny.tokenizer
    public = tok("Question: what is the dose?")["input_ids"]
    groups = [public] * 4
    cfg = DPDecodeConfig(public_confidence=0.0)
    rho = rho_for_epsilon(epsilon=2.0, delta=1e-5)
    res = dpd.dp_decode(
        BatchedDecoder(tiny.model, device=tiny.device, pad_id=0),
        public_prompt=public,
        group_prompts=groups,
        rho=rho,
        delta=1e-5,
        max_tokens=4,
        stop_ids=[],
        config=cfg,
        rng=random.Random(0),
    )
    cal = res.calibration
    assert res.svt_rounds >= 1 and cal is not None
    g, eps = cal.granularity, cal.eps_svt
    assert scales[0] == pytest.approx(2 * g / eps)
    assert set(np.round(scales[1:], 9)) <= {round(4 * g / eps, 9), round(2 * g / eps, 9)}
    assert round(4 * g / eps, 9) in set(np.round(scales, 9))


def test_public_prompt_used_by_the_engine_is_record_free(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prompt the engine runs as "public" is the one built with no record at all."""
    seen: list[list[int]] = []
    real = SplitDecoder.prefill

    def spy(self: SplitDecoder, public_prompt, group_prompts):  # noqa: ANN001
        seen.append(list(public_prompt))
        return real(self, public_prompt, group_prompts)

    monkeypatch.setattr(SplitDecoder, "prefill", spy)
    assert engine.answer(routed(prompt=QUESTION, epsilon=1.0, max_tokens=1))["status"] == "ok"
    assert seen == [engine.encode(QUESTION, None)]

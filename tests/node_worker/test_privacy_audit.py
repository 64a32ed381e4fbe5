"""Empirical privacy audits through the real node code, with a planted canary person
(Jagielski et al. 2020; Nasr et al. 2023). Issue #11, item 7b.

World "in" holds the canary, world "out" does not (neighbouring data sets). The mechanism runs
many times in each; an event E gives P[E | in] ≤ e^ε·P[E | out] + δ for any (ε, δ)-DP release, so
with Clopper–Pearson bounds at 95 % ε_lb = log((P_in_lo − δ)/P_out_hi) must stay ≤ the claimed ε.
A deliberately under-noised variant (σ/10) must be caught (ε_lb > claimed ε).

* aggregate path: :func:`fedllm.services.node_worker.aggregate.answer_on_cohort` (count of a rare
  diagnosis) on the real clinosim cohort plus a canary row; E = "noisy count ≥ T".
* text path: the engine's own retrieval and fixed-length prompts with a canary note, then
  :func:`fedllm.services.node_worker.dp_decode.dp_decode` releasing one paid token (the model's
  forward passes are deterministic, so they are memoised; the vote and the noise run each time);
  E = "token t is released" for the token t and direction chosen on a separate selection split.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import beta

from fedllm.common.config import Settings
from fedllm.privacy.rdp import rho_for_epsilon
from fedllm.services.node_worker import aggregate as agg
from fedllm.services.node_worker import dp_decode as dpd
from fedllm.services.node_worker.answering import Engine
from fedllm.services.node_worker.cohort import Diagnosis, PatientRecord, load_cohort
from fedllm.services.node_worker.dp_decode import BatchedDecoder, DPDecodeConfig, SplitDecoder
from fedllm.services.node_worker.model import LoadedModel
from fedllm.services.node_worker.records import HospitalRecords, Note

pytestmark = [pytest.mark.privacy_audit, pytest.mark.slow]

CLAIMED = 1.0
DELTA = 1e-5
CONF = 0.95


def cp(k: int, n: int) -> tuple[float, float]:
    a = 1 - CONF
    lo = 0.0 if k == 0 else float(beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def eps_lb(hits_in: int, n_in: int, hits_out: int, n_out: int) -> float:
    lo, _ = cp(hits_in, n_in)
    _, hi = cp(hits_out, n_out)
    return max(0.0, math.log((lo - DELTA) / hi)) if lo > DELTA else 0.0


# --------------------------------------------------------------------------- aggregate path


def _aggregate_audit(clinosim_source: Path, *, under_noised: bool, seed: int) -> float:
    cohort = load_cohort(clinosim_source)
    canary = PatientRecord(
        patient_id="pt-canary",
        age=40,
        sex="F",
        diagnoses=(Diagnosis("T66", "radiation sickness"),),
        medications=(),
        encounters=1,
        person_id="CANARY",
    )
    world_in = type(cohort)(patients=(*cohort.patients, canary), snapshot_date=cohort.snapshot_date)
    query = agg.parse_query({"op": "count", "where": {"diagnosis": "T66"}})
    rng = random.Random(seed)

    def runs(world, n: int) -> np.ndarray:  # noqa: ANN001
        return np.array(
            [
                agg.answer_on_cohort(
                    query=query, cohort=world, epsilon=CLAIMED, delta=DELTA, rng=rng
                ).noisy_count
                for _ in range(n)
            ]
        )

    real = agg.noisy_count
    if under_noised:
        agg.noisy_count = lambda *, value, sigma, rng: real(value=value, sigma=sigma / 10, rng=rng)
    try:
        sel_in, sel_out = runs(world_in, 1000), runs(cohort, 1000)
        best = max(
            range(int(sel_out.min()), int(sel_in.max()) + 2),
            key=lambda t: eps_lb(int((sel_in >= t).sum()), 1000, int((sel_out >= t).sum()), 1000),
        )
        ev_in, ev_out = runs(world_in, 4000), runs(cohort, 4000)
    finally:
        agg.noisy_count = real
    return eps_lb(int((ev_in >= best).sum()), 4000, int((ev_out >= best).sum()), 4000)


def test_aggregate_audit_stays_under_claimed_epsilon(clinosim_source: Path) -> None:
    assert _aggregate_audit(clinosim_source, under_noised=False, seed=1) <= CLAIMED


def test_aggregate_audit_catches_under_noised_variant(clinosim_source: Path) -> None:
    assert _aggregate_audit(clinosim_source, under_noised=True, seed=2) > CLAIMED


# --------------------------------------------------------------------------- text path

QUESTION = "Was anyone treated for xylophagia syndrome?"


class Memo(SplitDecoder):
    """SplitDecoder whose (deterministic) prefill is computed once per prompt set."""

    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def prefill(self, public_prompt, group_prompts):  # noqa: ANN001
        key = (tuple(public_prompt), tuple(map(tuple, group_prompts)))
        if key not in self.cache:
            self.cache[key] = super().prefill(public_prompt, group_prompts)
        return self.cache[key]


def _text_audit(engine: Engine, *, under_noised: bool, seed: int) -> float:
    notes = [n for g in engine.records.partition for n in g]
    key = b"a" * 32
    canary_text = None
    m = engine.groups
    out_recs = HospitalRecords(notes, key=key, groups=m)
    fillers = ["zz ", "!!!! ", "1 2 3 ", "qq ", "assistant: Yes. ", "xylophagia ", "% "]
    for i in range(len(fillers) * 2):  # a long canary note that moves its group's greedy token
        text = f"Xylophagia syndrome case {i}. " + fillers[i % len(fillers)] * (100 + 50 * (i // 7))
        canary = Note("canary-note", "CANARY", text)
        in_recs = HospitalRecords([*notes, canary], key=key, groups=m)
        prompts_in = [engine.encode(QUESTION, c) for c in in_recs.retrieve(QUESTION, per_group=1)]
        prompts_out = [engine.encode(QUESTION, c) for c in out_recs.retrieve(QUESTION, per_group=1)]
        dec = Memo(BatchedDecoder(engine.lm.model, device=engine.lm.device, pad_id=0))
        pub, gin = dec.prefill(engine.encode(QUESTION, None), prompts_in)
        _, gout = dec.prefill(engine.encode(QUESTION, None), prompts_out)
        changed = [g for g in range(m) if not torch.equal(gin[g], gout[g])]
        assert len(changed) <= 1
        cand = torch.topk(pub, k=32).indices
        if changed and int(gin[changed[0]][cand].argmax()) != int(gout[changed[0]][cand].argmax()):
            target = int(cand[int(gin[changed[0]][cand].argmax())])
            canary_text = text
            break
    assert canary_text is not None, "no canary note moved its group's vote"
    rho = rho_for_epsilon(epsilon=CLAIMED, delta=DELTA)
    cfg = DPDecodeConfig(
        use_svt=False, target_paid_tokens=1, vote_temperature=0.0, public_confidence=0.0
    )
    rng = random.Random(seed)
    real = dpd.sample_discrete_gaussian

    def weak(*, sigma, size, rng):  # noqa: ANN001  (the accounting still claims σ)
        return real(sigma=sigma / 10, size=size, rng=rng)

    def released(prompts: list[list[int]], n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            res = dpd.dp_decode(
                dec,
                public_prompt=engine.encode(QUESTION, None),
                group_prompts=prompts,
                rho=rho,
                delta=DELTA,
                max_tokens=1,
                stop_ids=[],
                config=cfg,
                rng=rng,
            )
            out.append(res.token_ids[0])
        return np.array(out)

    def bound(a: np.ndarray, b: np.ndarray, t: int) -> float:
        """ε lower bound from the event "token t released", world a against world b."""
        return eps_lb(int((a == t).sum()), len(a), int((b == t).sum()), len(b))

    if under_noised:
        dpd.sample_discrete_gaussian = weak
    try:
        # Choose the event (a token, and which world it points to) on a selection split, then
        # bound it on fresh runs.
        sel_in, sel_out = released(prompts_in, 400), released(prompts_out, 400)
        events = [(t, d) for t in {target, *sel_in.tolist(), *sel_out.tolist()} for d in (0, 1)]

        def sel_bound(e: tuple[int, int]) -> float:
            return bound(sel_in, sel_out, e[0]) if e[1] == 0 else bound(sel_out, sel_in, e[0])

        t, d = max(events, key=sel_bound)
        ev_in, ev_out = released(prompts_in, 1500), released(prompts_out, 1500)
        return bound(ev_in, ev_out, t) if d == 0 else bound(ev_out, ev_in, t)
    finally:
        dpd.sample_discrete_gaussian = real


@pytest.fixture
def engine(hospital_data_dir: Path, tiny: LoadedModel) -> Engine:
    # Two groups: the canary's group is pivotal, the strongest case for the auditor.
    return Engine(
        Settings(data_dir=hospital_data_dir), "st_mary", model=tiny, groups=2, rng=random.Random(0)
    )


def test_text_audit_stays_under_claimed_epsilon(engine: Engine) -> None:
    assert _text_audit(engine, under_noised=False, seed=3) <= CLAIMED


def test_text_audit_catches_under_noised_variant(engine: Engine) -> None:
    assert _text_audit(engine, under_noised=True, seed=4) > CLAIMED

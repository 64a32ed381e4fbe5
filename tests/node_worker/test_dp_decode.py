from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fedllm.privacy.rdp import DEFAULT_ORDERS, rho_for_epsilon
from fedllm.services.node_worker.dp_decode import (
    BatchedDecoder,
    DPDecodeConfig,
    calibrate,
    dp_decode,
)
from fedllm.services.node_worker.model import LoadedModel

ORDERS = np.asarray(DEFAULT_ORDERS)


def _prompts(tiny: LoadedModel, m: int) -> tuple[list[int], list[list[int]]]:
    tok = tiny.tokenizer
    public = tok("Question: what is the usual dose?")["input_ids"]
    filler = tok(" .")["input_ids"][-1]
    question = tok(" Question: what is the usual dose?")["input_ids"]
    groups = []
    for i in range(m):  # notes padded to one public length, as the engine does
        note = tok(f"Note {i}: patient on {'metformin ' * (i + 1)}.")["input_ids"][:40]
        groups.append(note + [filler] * (40 - len(note)) + question)
    return public, groups


def _run(
    tiny: LoadedModel,
    *,
    epsilon: float,
    m: int = 4,
    max_tokens: int = 12,
    seed: int = 0,
    groups: list[list[int]] | None = None,
    **cfg: object,
):
    public, gp = _prompts(tiny, m)
    rho = rho_for_epsilon(epsilon=epsilon, delta=1e-5) if epsilon else 0.0
    dec = BatchedDecoder(tiny.model, device=tiny.device, pad_id=tiny.tokenizer.pad_token_id)
    res = dp_decode(
        dec,
        public_prompt=public,
        group_prompts=groups if groups is not None else gp,
        rho=rho,
        delta=1e-5,
        max_tokens=max_tokens,
        stop_ids=[],
        config=DPDecodeConfig(**cfg),
        rng=random.Random(seed),
    )
    return res, rho


def test_batched_logits_match_unbatched(tiny: LoadedModel) -> None:
    public, groups = _prompts(tiny, 3)
    prompts = [public, *groups]
    batched = BatchedDecoder(tiny.model, device=tiny.device, pad_id=tiny.tokenizer.pad_token_id)
    got = [batched.prefill(prompts)]
    for t in (11, 42, 7):
        got.append(batched.step(t))
    for row, p in enumerate(prompts):
        alone = BatchedDecoder(tiny.model, device=tiny.device, pad_id=0)
        ref = [alone.prefill([p])]
        for t in (11, 42, 7):
            ref.append(alone.step(t))
        with torch.inference_mode():  # and without any cache at all
            full = tiny.model(torch.tensor([p + [11, 42, 7]])).logits[0, -4:].float()
        for step, (g, r) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(g[row], r[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(g[row], full[step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_svt", [True, False])
def test_spent_curve_is_composition_and_within_reservation(
    tiny: LoadedModel, use_svt: bool
) -> None:
    res, rho = _run(tiny, epsilon=3.0, use_svt=use_svt, max_tokens=10)
    spent = res.curve.as_array()
    assert np.all(spent <= rho * ORDERS)
    composed = sum((r.rdp(DEFAULT_ORDERS) for r in res.runs), np.zeros_like(ORDERS))
    np.testing.assert_allclose(spent, composed, rtol=1e-12)
    cal = res.calibration
    expected = res.paid_tokens * cal.token_rdp(DEFAULT_ORDERS)
    if use_svt:
        expected = expected + res.svt_rounds * cal.svt_rdp(DEFAULT_ORDERS)
    np.testing.assert_allclose(spent, expected, rtol=1e-12)
    assert res.paid_tokens == sum(r.kind == "gaussian" for r in res.runs)
    assert res.svt_rounds == sum(r.kind == "svt" for r in res.runs)
    assert res.epsilon == pytest.approx(res.curve.epsilon(delta=1e-5))
    assert res.epsilon <= 3.0 + 1e-9
    assert len(res.token_ids) == res.paid_tokens + res.free_tokens
    if not use_svt:
        assert res.free_tokens == 0 and res.svt_rounds == 0


def test_stops_when_budget_exhausted(tiny: LoadedModel) -> None:
    res, rho = _run(tiny, epsilon=1.0, use_svt=False, max_tokens=200, target_paid_tokens=5)
    assert res.stop_reason == "budget"
    assert res.paid_tokens == 5  # calibrated for exactly 5 paid tokens
    cal = res.calibration
    one_more = res.curve.as_array() + cal.token_rdp(DEFAULT_ORDERS)
    assert np.any(one_more > rho * ORDERS)
    assert np.all(res.curve.as_array() <= rho * ORDERS)


def test_svt_with_budget_exhausted_still_within(tiny: LoadedModel) -> None:
    for seed in range(3):
        res, rho = _run(tiny, epsilon=1.0, max_tokens=200, seed=seed, target_paid_tokens=3)
        assert res.stop_reason == "budget"
        assert res.paid_tokens <= 3 and res.svt_rounds <= 4
        assert np.all(res.curve.as_array() <= rho * ORDERS)


def test_zero_budget_releases_nothing(tiny: LoadedModel) -> None:
    res, _ = _run(tiny, epsilon=0.0)
    assert res.token_ids == [] and res.stop_reason == "budget"
    assert res.epsilon == 0.0 and not any(res.curve.values)


def test_tokens_the_public_pass_predicts_are_free(tiny: LoadedModel) -> None:
    # Every group sees exactly the public prompt: all agree with the public greedy token, so
    # with a generous budget the SVT releases (almost) everything for free.
    public, _ = _prompts(tiny, 8)
    res, rho = _run(
        tiny,
        epsilon=10.0,
        m=8,
        groups=[public] * 8,
        max_tokens=12,
        svt_threshold=1.0,
        svt_share=0.9,
    )
    assert res.free_tokens >= 6
    # Free tokens are the public greedy continuation.
    dec = BatchedDecoder(tiny.model, device=tiny.device, pad_id=0)
    logits = dec.prefill([public])
    for t in res.token_ids:
        assert t == int(logits[0].argmax()) or res.paid_tokens > 0
        logits = dec.step(t)
    assert np.all(res.curve.as_array() <= rho * ORDERS)


def test_public_confidence_shortcut_costs_nothing(tiny: LoadedModel) -> None:
    res, _ = _run(tiny, epsilon=1.0, public_confidence=1e-9, max_tokens=6)
    assert res.free_tokens == 6 and res.paid_tokens == 0 and res.svt_rounds == 0
    assert res.epsilon == 0.0 and not any(res.curve.values)
    assert res.stop_reason == "max_tokens"


def test_calibration_fits_exactly_the_target() -> None:
    for eps in (0.5, 1.0, 10.0):
        rho = rho_for_epsilon(epsilon=eps, delta=1e-5)
        for use_svt in (True, False):
            cfg = DPDecodeConfig(target_paid_tokens=7, use_svt=use_svt)
            cal = calibrate(rho=rho, groups=8, config=cfg)
            total = 7 * cal.token_rdp(DEFAULT_ORDERS)
            if use_svt:
                total = total + 8 * cal.svt_rdp(DEFAULT_ORDERS)
            assert np.all(total <= rho * ORDERS)
            assert np.max(total / (rho * ORDERS)) > 0.999  # and nearly uses all of it
    assert calibrate(rho=0.0, groups=4, config=DPDecodeConfig()) is None


def test_seeded_runs_are_reproducible(tiny: LoadedModel) -> None:
    a, _ = _run(tiny, epsilon=5.0, seed=7, max_tokens=8)
    b, _ = _run(tiny, epsilon=5.0, seed=7, max_tokens=8)
    assert a.token_ids == b.token_ids and a.curve == b.curve

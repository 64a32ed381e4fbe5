"""Differentially private decoding over disjoint patient groups (private prediction per token).

Neighbouring relation: one patient's records added or removed. Records are split into ``m``
disjoint groups by a keyed hash of the patient id and each group retrieves from itself only
(:mod:`fedllm.services.node_worker.records`), so a neighbouring dataset changes **at most one** of the
``m`` group-conditioned prompts. A further "public" prompt carries no records at all.

Each decoding step runs **two forward passes** (with KV cache), all rows continued with the same
already-released tokens: one over the ``m`` group prompts, which all have the same public token
length (so the batch has a data-independent shape and no padding), and one over the public
prompt **alone**, so its logits cannot depend on any record (:class:`SplitDecoder`).

1. Candidates ``C``: the public pass's top-k tokens plus the stop tokens. They depend only on
   the question and on released tokens, so restricting to them is data-independent.
2. Votes: group i's distribution over ``C`` (softmax of its logits at ``vote_temperature``, or a
   one-hot vote when it is 0), put on the integer grid ``v_i = ⌊g·p_i⌋`` (``g`` =
   ``granularity``). The softmax is computed in log space in float64; any non-finite value
   fails closed (:class:`NonFiniteVotes`); each row is clipped to ``v_i ≥ 0``, ``‖v_i‖₁ ≤ g``
   (:func:`clip_votes`), whatever the logits. The temperature must be 0 or in the public
   range [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``] (:func:`check_temperature`). Then replacing one group's vote moves the
   histogram ``H = Σ v_i`` by at most ``√(‖v_i‖₂² + ‖v_i'‖₂²) ≤ √2·g`` in L2 (Δ₂ = √2·g) and
   changes any single coordinate by at most ``g`` (Δ₁ of the SVT query below = g).
3. Sparse vector test (Lyu, Su & Li 2017, "Understanding the Sparse Vector Technique", Alg. 1
   with c = 1, ε₁ = ε₂ = ε_svt/2): the query ``q = g·#{i : argmax_C logits_i ≠ ŷ₀}`` counts
   (on the grid) the groups whose greedy token differs from the public greedy token ``ŷ₀``;
   one group changes it by at most ``g`` (Δ₁ = g). If ``q + DLap(4g/ε_svt) < T + DLap(2g/ε_svt)``
   the public token is released and costs nothing beyond the round. Otherwise ("above") the
   round ends and one token is paid for. One round (all its "below" answers and the final
   "above") is ε_svt-DP, charged as RDP ``min(ε_svt, α·ε_svt²/2)`` (Bun–Steinke 2016 Prop. 3.3).
   The shift argument of the proof holds verbatim for integer queries and discrete Laplace
   noise (integer shifts by Δ and 2Δ). Optionally (``public_confidence``) a token the public
   pass predicts with probability ≥ a cut-off is released with no test at all: a function of
   the public pass only, hence free.
4. Paid token: report-noisy-max with discrete Gaussian noise, ``argmax_c H[c] + N_ℤ(0, σ_g²)``.
   This is post-processing of the noisy histogram, a Gaussian mechanism of L2 sensitivity
   ``√2·g``: RDP ``α·(√2·g)²/(2σ_g²)`` (Canonne, Kamath & Steinke 2020: the discrete Gaussian
   has the continuous Gaussian's zCDP bound).

All noise is integer noise from :mod:`fedllm.privacy.mechanisms` (exact samplers), added to
integer histograms, so no floating-point artefact depends on the records.

Accounting: the caller passes the reserved zCDP ρ (the accountant reserved the curve ρ·α).
The decoder starts a round only if its cost fits and pays a token only if its cost fits,
pointwise on the Rényi orders, so the spent curve never exceeds ρ·α. Calibration (see
:func:`calibrate`) sizes σ and ε_svt so that ``target_paid_tokens`` paid tokens and one more
SVT round than that exactly exhaust ρ.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.calibration import sigma_for_rho
from fedllm.privacy.mechanisms import sample_discrete_gaussian, sample_discrete_laplace
from fedllm.privacy.rdp import DEFAULT_ORDERS, gaussian_rdp, pure_dp_rdp
from fedllm.services.node_worker.settings import MAX_TEMPERATURE, MIN_TEMPERATURE

Rng = random.Random | np.random.Generator

# Calibrate against a hair less than the reservation so float rounding never overshoots it.
_SAFETY = 1.0 - 1e-9


# --------------------------------------------------------------------------- configuration


class NonFiniteVotes(RuntimeError):
    """A logit or vote probability was not finite: the mechanism fails closed (and is charged)."""


class InvalidTemperature(ValueError):
    """A vote temperature outside the public range."""


def check_temperature(temperature: float) -> float:
    """``temperature`` if it is 0 or within [MIN_TEMPERATURE, MAX_TEMPERATURE]; else raises."""
    t = float(temperature)
    if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise InvalidTemperature(
            f"temperature must be 0 or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]; got {t!r}"
        )
    return t


@dataclass(frozen=True, slots=True)
class DPDecodeConfig:
    """Knobs of the DP decoder; every one is data-independent."""

    target_paid_tokens: int = 6
    """σ and ε_svt are calibrated so that this many paid tokens fit in the budget."""
    use_svt: bool = True
    """Release tokens the public pass predicts through the sparse vector test."""
    svt_share: float = 0.6
    """Fraction of ρ given to SVT rounds (the rest pays tokens)."""
    svt_threshold: float = 0.75
    """Pay for a token when more than this fraction of the groups' argmax votes disagree with
    the public token (before noise)."""
    public_confidence: float = 0.0
    """If > 0: when the public pass's top token has at least this probability, release it with
    no mechanism at all (a function of the public pass only, so it costs nothing). 0 disables;
    the records then can still override confident public tokens through the SVT."""
    candidate_k: int = 32
    """Candidates per step: the public pass's top-k tokens (plus stop tokens)."""
    vote_temperature: float = 1.0
    """Temperature of each group's vote softmax; 0 gives one-hot (argmax) votes."""
    granularity: int = 1000
    """Integer grid g: votes are ⌊g·p⌋."""

    def __post_init__(self) -> None:
        if self.target_paid_tokens < 1:
            raise ValueError("target_paid_tokens must be >= 1")
        if not 0.0 < self.svt_share < 1.0:
            raise ValueError("svt_share must be in (0, 1)")
        if not 0.0 <= self.public_confidence <= 1.0:
            raise ValueError("public_confidence must be in [0, 1]")
        if not 0.0 <= self.svt_threshold <= 1.0:
            raise ValueError("svt_threshold must be in [0, 1]")
        if self.candidate_k < 1:
            raise ValueError("candidate_k must be >= 1")
        check_temperature(self.vote_temperature)
        if self.granularity < 1:
            raise ValueError("granularity must be >= 1")


@dataclass(frozen=True, slots=True)
class Calibration:
    """Noise for one query, on the integer grid."""

    groups: int
    granularity: int
    sigma: float
    """Discrete Gaussian σ_g on the vote histogram (grid units)."""
    sensitivity: float
    """L2 sensitivity of the histogram, √2·g (grid units)."""
    eps_svt: float
    """Pure ε of one SVT round (0 when SVT is off)."""
    threshold: int
    """SVT threshold T on the grid."""

    @property
    def token_rho(self) -> float:
        return self.sensitivity**2 / (2 * self.sigma**2)

    def token_rdp(self, orders: Sequence[float]) -> np.ndarray:
        return gaussian_rdp(
            orders=orders, noise_multiplier=self.sigma, sensitivity=self.sensitivity
        )

    def svt_rdp(self, orders: Sequence[float]) -> np.ndarray:
        return pure_dp_rdp(orders=orders, epsilon=self.eps_svt)


def calibrate(*, rho: float, groups: int, config: DPDecodeConfig) -> Calibration | None:
    """σ and ε_svt for a reserved ρ, or None if ρ is 0 (nothing can be paid).

    With N = ``target_paid_tokens`` and SVT on: N paid tokens and N + 1 SVT rounds fit exactly,
    ``(N+1)·ε_svt²/2 + N·Δ²/(2σ²) = ρ`` with the SVT share s: ε_svt = √(2sρ/(N+1)) and
    σ = Δ/√(2(1−s)ρ/N). With SVT off: σ = Δ/√(2ρ/N). Δ = √2·g on the grid, so in units of
    "groups" the token noise is σ/g = 1/√ρ_token.
    """
    if not rho > 0 or not math.isfinite(rho):
        return None
    rho = rho * _SAFETY
    g = config.granularity
    n = config.target_paid_tokens
    sens = math.sqrt(2.0) * g
    if config.use_svt:
        rho_round = config.svt_share * rho / (n + 1)
        rho_token = (1.0 - config.svt_share) * rho / n
        eps_svt = math.sqrt(2.0 * rho_round)
    else:
        rho_token, eps_svt = rho / n, 0.0
    sigma = sigma_for_rho(rho=rho_token, sensitivity=sens)
    threshold = round(config.svt_threshold * groups * g)
    return Calibration(
        groups=groups,
        granularity=g,
        sigma=sigma,
        sensitivity=sens,
        eps_svt=eps_svt,
        threshold=threshold,
    )


# --------------------------------------------------------------------------- batched model


class BatchedDecoder:
    """Several prompts continued with the same tokens: one forward pass per step, KV-cached.

    Prompts are left-padded; position ids count only real tokens, so each row's logits equal
    those of running it alone (up to float rounding).
    """

    def __init__(self, model: Any, *, device: torch.device, pad_id: int) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.past: Any = None
        self.mask: torch.Tensor | None = None
        self.next_pos: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run the prompts; returns last-position logits (B, V) as float32."""
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: (B, 1, V), not (B, T, V)
        )
        self.past, self.mask = out.past_key_values, mask
        self.next_pos = pos[:, -1:] + 1
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        """Append ``token_id`` to every row; returns the next logits (B, V)."""
        assert self.mask is not None and self.next_pos is not None, "prefill first"
        b = self.mask.shape[0]
        ids = torch.full((b, 1), int(token_id), dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=self.next_pos,
            past_key_values=self.past,
            use_cache=True,
        )
        self.past = out.past_key_values
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :].float()


class SplitDecoder:
    """The record-free public row in its own forward pass; the m group rows in another.

    The group prompts must all have one length (the engine makes it a public constant), so
    the group batch has a data-independent shape; the public row never shares a batch with a
    record, so its logits are bit-identical on neighbouring data sets.
    """

    def __init__(self, groups: BatchedDecoder) -> None:
        self.groups = groups
        self.public = BatchedDecoder(groups.model, device=groups.device, pad_id=groups.pad_id)

    def prefill(
        self, public_prompt: Sequence[int], group_prompts: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pub = self.public.prefill([list(public_prompt)])[0]
        return pub, self.groups.prefill([list(p) for p in group_prompts])

    def step(self, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.public.step(token_id)[0], self.groups.step(token_id)


# --------------------------------------------------------------------------- the decoder


@dataclass(frozen=True, slots=True)
class MechanismRun:
    """One mechanism actually run: ``kind`` is "svt" (pure ε) or "gaussian" (σ, Δ)."""

    kind: str
    epsilon: float = 0.0
    sigma: float = 0.0
    sensitivity: float = 0.0

    def rdp(self, orders: Sequence[float]) -> np.ndarray:
        if self.kind == "svt":
            return pure_dp_rdp(orders=orders, epsilon=self.epsilon)
        if self.kind == "gaussian":
            return gaussian_rdp(
                orders=orders, noise_multiplier=self.sigma, sensitivity=self.sensitivity
            )
        raise ValueError(f"unknown mechanism {self.kind!r}")


@dataclass(slots=True)
class DPDecodeResult:
    token_ids: list[int]
    text: str
    paid_tokens: int
    free_tokens: int
    svt_rounds: int
    stop_reason: str  # "eos" | "max_tokens" | "budget"
    curve: PrivacyCurve
    epsilon: float
    delta: float
    runs: list[MechanismRun] = field(default_factory=list)
    calibration: Calibration | None = None


def clip_votes(votes: np.ndarray, granularity: int) -> np.ndarray:
    """Each row clipped to entries in [0, g] and L1 norm ≤ g (rows over g scaled down, floored).

    The sensitivity analysis assumes exactly this, so it is enforced rather than trusted.
    """
    v = np.clip(np.asarray(votes, dtype=np.int64), 0, granularity)
    l1 = v.sum(axis=1, keepdims=True)
    over = (l1 > granularity).ravel()
    if over.any():
        v[over] = (v[over] * granularity) // l1[over]
    return v


def _votes(
    logits: torch.Tensor, cand: torch.Tensor, *, temperature: float, granularity: int
) -> np.ndarray:
    """Integer votes ⌊g·p_i⌋ of each row over the candidates, shape (rows, |C|), clipped."""
    sub = logits[:, cand].double()
    if not bool(torch.isfinite(sub).all()):
        raise NonFiniteVotes("non-finite logits")
    if temperature <= 0:
        p = torch.zeros_like(sub)
        p[torch.arange(sub.shape[0]), sub.argmax(dim=-1)] = 1.0
    else:
        z = sub / check_temperature(temperature)
        p = torch.exp(z - torch.logsumexp(z, dim=-1, keepdim=True))  # log space: no overflow
    if not bool(torch.isfinite(p).all()):
        raise NonFiniteVotes("non-finite vote probabilities")
    v = torch.floor(p * granularity).to(torch.int64).cpu().numpy()
    return clip_votes(v, granularity)


def _candidates(public_logits: torch.Tensor, *, k: int, stop_ids: Sequence[int]) -> torch.Tensor:
    """The public pass's top-k (best first) plus stop tokens; depends on no record."""
    top = torch.topk(public_logits, k=min(k, public_logits.shape[-1])).indices.tolist()
    for s in stop_ids:
        if s not in top:
            top.append(s)
    return torch.tensor(top, dtype=torch.long, device=public_logits.device)


def dp_decode(
    decoder: BatchedDecoder | SplitDecoder,
    *,
    public_prompt: Sequence[int],
    group_prompts: Sequence[Sequence[int]],
    rho: float,
    delta: float,
    max_tokens: int,
    stop_ids: Sequence[int],
    config: DPDecodeConfig,
    rng: Rng,
    detokenize: Any = None,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> DPDecodeResult:
    """Release up to ``max_tokens`` tokens privately; spends at most the curve ρ·α.

    ``group_prompts[i]`` is group i's prompt (its records + the question), all of one length,
    and ``public_prompt`` the record-free one, run in its own forward pass. Returns the tokens
    and the RDP curve actually spent (the composition of the mechanism runs in ``runs``).
    Raises :class:`NonFiniteVotes` (fail closed) if a vote cannot be computed.
    """
    m = len(group_prompts)
    if m < 1:
        raise ValueError("need at least one group")
    if len({len(p) for p in group_prompts}) != 1:
        raise ValueError("group prompts must all have the same (public) length")
    check_temperature(config.vote_temperature)
    split = decoder if isinstance(decoder, SplitDecoder) else SplitDecoder(decoder)
    orders = tuple(float(a) for a in orders)
    a = np.asarray(orders)
    budget = rho * a
    spent = np.zeros_like(a)
    runs: list[MechanismRun] = []
    cal = calibrate(rho=rho, groups=m, config=config)
    released: list[int] = []
    paid = free = rounds = 0
    stop_reason = "max_tokens"

    def fits(extra: np.ndarray) -> bool:
        return bool(np.all(spent + extra <= budget))

    if cal is None or max_tokens <= 0:
        stop_reason = "budget" if cal is None else "max_tokens"
    else:
        token_cost = cal.token_rdp(orders)
        round_cost = cal.svt_rdp(orders) if config.use_svt else None
        public_logits, logits = split.prefill(public_prompt, group_prompts)
        round_open = False
        noisy_threshold = 0
        while len(released) < max_tokens:
            if not bool(torch.isfinite(public_logits).all()):
                raise NonFiniteVotes("non-finite public logits")
            cand = _candidates(public_logits, k=config.candidate_k, stop_ids=stop_ids)
            token: int | None = None
            if config.public_confidence > 0:
                p_top = float(torch.softmax(public_logits.double(), dim=-1)[cand[0]])
                if p_top >= config.public_confidence:
                    token = int(cand[0])
                    free += 1
            if token is None and config.use_svt:
                assert round_cost is not None
                if not round_open:
                    if not fits(round_cost):
                        stop_reason = "budget"
                        break
                    spent = spent + round_cost
                    runs.append(MechanismRun("svt", epsilon=cal.eps_svt))
                    rounds += 1
                    round_open = True
                    noisy_threshold = cal.threshold + int(
                        sample_discrete_laplace(
                            scale=2 * cal.granularity / cal.eps_svt, size=1, rng=rng
                        )[0]
                    )
                # Disagreement with the public token: groups whose argmax differs (one-hot votes).
                agree = _votes(logits, cand, temperature=0.0, granularity=cal.granularity)
                q = m * cal.granularity - int(agree[:, 0].sum())
                nu = int(
                    sample_discrete_laplace(
                        scale=4 * cal.granularity / cal.eps_svt, size=1, rng=rng
                    )[0]
                )
                if q + nu < noisy_threshold:
                    token = int(cand[0])
                    free += 1
                else:
                    round_open = False
            if token is None:
                if not fits(token_cost):
                    stop_reason = "budget"
                    break
                spent = spent + token_cost
                runs.append(MechanismRun("gaussian", sigma=cal.sigma, sensitivity=cal.sensitivity))
                hist = _votes(
                    logits,
                    cand,
                    temperature=config.vote_temperature,
                    granularity=cal.granularity,
                ).sum(axis=0)
                noise = sample_discrete_gaussian(sigma=cal.sigma, size=len(hist), rng=rng)
                token = int(cand[int(np.argmax(hist + noise))])
                paid += 1
            released.append(token)
            if token in stop_ids:
                stop_reason = "eos"
                break
            if len(released) >= max_tokens:
                break
            public_logits, logits = split.step(token)
    curve = PrivacyCurve.from_array(orders=orders, values=spent)
    eps = curve.epsilon(delta=delta) if paid + rounds else 0.0
    body = [t for t in released if t not in stop_ids]
    text = detokenize(body) if detokenize is not None else ""
    return DPDecodeResult(
        token_ids=released,
        text=text,
        paid_tokens=paid,
        free_tokens=free,
        svt_rounds=rounds,
        stop_reason=stop_reason,
        curve=curve,
        epsilon=eps,
        delta=delta,
        runs=runs,
        calibration=cal,
    )

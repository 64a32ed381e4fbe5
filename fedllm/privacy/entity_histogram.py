"""Answer-level DP: release a histogram of per-group entity votes with discrete Gaussian noise.

Setting (DP-ICL's keyword-space aggregation, Wu et al. ICLR 2024, on disjoint patient groups):
the records are split into m disjoint groups by patient; each group i computes, from its own
records only, a set S_i of at most K entities from a **public** vocabulary V. The released
quantity is the vote histogram h[v] = #{i : v ∈ S_i} plus N_ℤ(0, σ²) on every entry of V.

Sensitivity. Adding or removing one patient changes one group's records, hence at most one set:
S_i → S_i'. The histogram changes by 1_{S_i'} − 1_{S_i}, whose squared L2 norm is
|S_i Δ S_i'| ≤ |S_i| + |S_i'| ≤ 2K. So Δ₂ = √(2K) (not √K: the group may *drop* up to K
entities and *gain* up to K others). The exact discrete Gaussian with integer-valued queries of
L2 sensitivity Δ₂ is Δ₂²/(2σ²)-zCDP (Canonne, Kamath & Steinke 2020, Thm 14 in the multivariate
form), i.e. RDP ε(α) = α·K/σ². Everything derived from the noisy histogram (the ranking, the
answer text) is post-processing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.privacy.accountant import PrivacyCurve
from fedllm.privacy.calibration import calibrate_parts
from fedllm.privacy.mechanisms import sample_discrete_gaussian
from fedllm.privacy.rdp import DEFAULT_ORDERS

__all__ = ["EntityRelease", "entity_sensitivity_sq", "release_entity_votes"]

Rng = random.Random | np.random.Generator


def entity_sensitivity_sq(*, max_entities: int) -> int:
    """Squared L2 sensitivity of the vote histogram when each group names ≤ K entities: 2K."""
    if isinstance(max_entities, bool) or not isinstance(max_entities, int) or max_entities < 1:
        raise ValueError(f"max_entities must be an int >= 1; got {max_entities!r}")
    return 2 * max_entities


@dataclass(frozen=True, slots=True)
class EntityRelease:
    """The DP release: noisy vote counts over the public vocabulary, σ and the curve spent."""

    counts: np.ndarray
    sigma: float
    curve: PrivacyCurve
    groups: int
    max_entities: int

    def ranked(self, top: int) -> list[tuple[int, int]]:
        """(vocabulary index, noisy count) of the ``top`` largest counts, ties by index."""
        order = sorted(range(len(self.counts)), key=lambda i: (-int(self.counts[i]), i))
        return [(i, int(self.counts[i])) for i in order[:top]]


def release_entity_votes(
    votes: Sequence[Sequence[int]],
    *,
    vocab_size: int,
    max_entities: int,
    rho: float,
    rng: Rng,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> EntityRelease:
    """Noisy histogram of the groups' entity sets under ρ-zCDP.

    ``votes[i]`` are the vocabulary indices group i names; a set larger than ``max_entities``
    is refused (the caller clips: the analysis assumes it), and duplicates count once.
    σ = √(2K/(2ρ)) = √(K/ρ), widened by a relative 1e-12 until the spent ρ ≤ ``rho``.
    """
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be finite and > 0; got {rho}")
    if vocab_size < 1:
        raise ValueError("vocab_size must be >= 1")
    d2 = entity_sensitivity_sq(max_entities=max_entities)
    hist = np.zeros(vocab_size, dtype=np.int64)
    for i, group in enumerate(votes):
        s = set(group)
        if len(s) > max_entities:
            raise ValueError(f"group {i} names {len(s)} entities > K = {max_entities}")
        for v in s:
            if not 0 <= v < vocab_size:
                raise ValueError(f"group {i} names index {v} outside the vocabulary")
            hist[v] += 1
    (sigma,), spent = calibrate_parts(rho=rho, parts=[(d2, 1.0)])
    noisy = hist + sample_discrete_gaussian(sigma=sigma, size=vocab_size, rng=rng)
    return EntityRelease(
        counts=noisy,
        sigma=sigma,
        curve=PrivacyCurve.from_rho(spent, orders),
        groups=len(votes),
        max_entities=max_entities,
    )

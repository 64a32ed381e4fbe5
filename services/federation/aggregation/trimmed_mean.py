"""Coordinate-wise trimmed mean (Yin et al. 2018; Flower ``strategy/fedtrimmedavg.py``): drop
the ``beta`` share of largest and of smallest values per coordinate, average the rest."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.services.federation.aggregation.base import Aggregator


class TrimmedMean(Aggregator):
    name = "trimmed_mean"

    def __init__(self, beta: float = 0.2) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5); got {beta}")
        self.beta = beta

    def aggregate(self, updates: Sequence[np.ndarray]) -> np.ndarray:
        m = np.sort(self._stack(updates), axis=0)
        n = m.shape[0]
        k = int(np.floor(self.beta * n))
        if n >= 3:
            k = max(k, 1)  # with 3+ updates, always drop at least one extreme each side
        if n - 2 * k < 1:
            k = (n - 1) // 2
        return m[k : n - k].mean(axis=0)

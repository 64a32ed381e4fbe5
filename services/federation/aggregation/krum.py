"""Krum (Blanchard et al. 2017; Flower ``strategy/krum.py``): pick the update whose summed
squared distance to its n − f − 2 nearest neighbours is least (f = assumed Byzantine count)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.services.federation.aggregation.base import Aggregator


class Krum(Aggregator):
    name = "krum"

    def __init__(self, byzantine: int = 1) -> None:
        if byzantine < 0:
            raise ValueError("byzantine must be >= 0")
        self.byzantine = byzantine

    def aggregate(self, updates: Sequence[np.ndarray]) -> np.ndarray:
        m = self._stack(updates)
        n = m.shape[0]
        if n <= 2:
            return np.median(m, axis=0)
        k = max(1, n - self.byzantine - 2)
        d = ((m[:, None, :] - m[None, :, :]) ** 2).sum(axis=2)
        scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(n)]
        return m[int(np.argmin(scores))].copy()

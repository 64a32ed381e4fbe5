"""Coordinate-wise median (Yin et al. 2018; Flower ``strategy/fedmedian.py``): robust to any
minority of arbitrary updates, coordinate by coordinate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.services.federation.aggregation.base import Aggregator


class CoordinateMedian(Aggregator):
    name = "median"

    def aggregate(self, updates: Sequence[np.ndarray]) -> np.ndarray:
        return np.median(self._stack(updates), axis=0)

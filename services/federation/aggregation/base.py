"""The one interface every aggregation rule implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np


class Aggregator(ABC):
    """Maps the participants' update vectors (same length) to one aggregate update."""

    name: str = ""
    #: True when the rule needs each update (so it cannot run on a secure sum).
    needs_individual_updates: bool = True

    @abstractmethod
    def aggregate(self, updates: Sequence[np.ndarray]) -> np.ndarray: ...

    @staticmethod
    def _stack(updates: Sequence[np.ndarray]) -> np.ndarray:
        if not updates:
            raise ValueError("no updates to aggregate")
        m = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
        if m.ndim != 2:
            raise ValueError("updates must be flat vectors of one length")
        return m

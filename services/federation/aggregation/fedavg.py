"""FedAvg (McMahan et al. 2017; Flower ``strategy/fedavg.py``): the mean of the updates.

Updates are weighted equally: a hospital's number of patients is private, so it is not sent.
FedProx (Li et al. 2020) changes only local training (the proximal term μ/2‖w − w_global‖²),
so it aggregates with this rule too. On a secure sum the mean is sum / participants.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedllm.services.federation.aggregation.base import Aggregator


class FedAvg(Aggregator):
    name = "fedavg"
    needs_individual_updates = False

    def aggregate(self, updates: Sequence[np.ndarray]) -> np.ndarray:
        return self._stack(updates).mean(axis=0)

    @staticmethod
    def from_sum(total: np.ndarray, *, participants: int) -> np.ndarray:
        if participants < 1:
            raise ValueError("participants must be >= 1")
        return np.asarray(total, dtype=np.float64) / participants

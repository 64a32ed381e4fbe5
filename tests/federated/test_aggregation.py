"""Aggregation rules: FedAvg is the mean; robust rules neutralise a 100x Byzantine update."""

from __future__ import annotations

import numpy as np
import pytest

from fedllm.services.federation.aggregation import FedAvg, make_rule

pytestmark = pytest.mark.federated


def _honest(n: int, dim: int = 400, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    return [centre + 0.05 * rng.normal(size=dim) for _ in range(n)], centre


def test_fedavg_is_mean_and_from_sum_agrees() -> None:
    ups, _ = _honest(4)
    assert np.allclose(FedAvg().aggregate(ups), np.mean(ups, axis=0))
    assert np.allclose(FedAvg.from_sum(np.sum(ups, axis=0), participants=4), np.mean(ups, axis=0))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum"])
def test_byzantine_100x_update_is_neutralised(rule: str) -> None:
    honest, centre = _honest(4)
    byzantine = -100.0 * honest[0]
    agg = make_rule(rule).aggregate([*honest, byzantine])
    honest_mean = np.mean(honest, axis=0)
    # the robust aggregate stays near the honest mean ...
    assert np.linalg.norm(agg - honest_mean) < 0.2 * np.linalg.norm(honest_mean)
    # ... while plain FedAvg is dragged far away by the one attacker
    avg = FedAvg().aggregate([*honest, byzantine])
    assert np.linalg.norm(avg - honest_mean) > 10 * np.linalg.norm(honest_mean)


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        make_rule("mode")

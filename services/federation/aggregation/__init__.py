"""Aggregation rules, one per module, behind :class:`Aggregator` (as Flower's strategies).

Robust rules (median, trimmed mean, Krum) need the individual updates, so they apply only when
secure aggregation is off; with secure aggregation the coordinator sees the sum alone and the
rule is FedAvg over updates each trainer clipped to ``update_clip`` before masking.
"""

from __future__ import annotations

from fedllm.services.federation.aggregation.base import Aggregator
from fedllm.services.federation.aggregation.fedavg import FedAvg
from fedllm.services.federation.aggregation.krum import Krum
from fedllm.services.federation.aggregation.median import CoordinateMedian
from fedllm.services.federation.aggregation.trimmed_mean import TrimmedMean

RULES: dict[str, type[Aggregator]] = {
    "fedavg": FedAvg,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
    "krum": Krum,
}


def make_rule(name: str) -> Aggregator:
    """The rule named ``name``; an unknown name raises ValueError."""
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; choose from {sorted(RULES)}")
    return RULES[name]()


__all__ = ["RULES", "Aggregator", "CoordinateMedian", "FedAvg", "Krum", "TrimmedMean", "make_rule"]

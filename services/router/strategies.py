"""The routing strategies by their config name (`FEDLLM_ROUTER_STRATEGY`).

The default is the winner of `bench/routing_sim.py` (see docs/routing.md for the figures).
"""

from __future__ import annotations

from collections.abc import Callable

from fedllm.services.router.assignment import BatchAssignment
from fedllm.services.router.least_load import DepartmentLeastLoad
from fedllm.services.router.power_of_two import PowerOfTwoChoices
from fedllm.services.router.privacy_aware import PrivacyAware
from fedllm.services.router.response_time import WeightedResponseTime
from fedllm.services.router.round_robin import RoundRobin
from fedllm.services.router.strategy import RoutingStrategy

STRATEGIES: dict[str, Callable[[], RoutingStrategy]] = {
    "round_robin": RoundRobin,
    "least_load": DepartmentLeastLoad,
    "response_time": WeightedResponseTime,
    "power_of_two": PowerOfTwoChoices,
    "privacy_aware": PrivacyAware,
    "assignment": BatchAssignment,
}


def build_strategy(name: str) -> RoutingStrategy:
    """A fresh strategy by name; unknown names raise ValueError listing the known ones."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    return factory()

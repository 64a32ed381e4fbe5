"""Round-robin: the baseline every other strategy is measured against.

Each candidate set (see :func:`fedllm.services.router.strategy.candidates`) is cycled in hospital-id
order, ignoring load and latency — Envoy's `ROUND_ROBIN` and nginx's default upstream policy
(Envoy docs, "Supported load balancers"). One counter per distinct candidate set, so requests of
a department hosted by three nodes rotate over those three.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.strategy import Candidates, Choice, PoolStrategy


class RoundRobin(PoolStrategy):
    """Cycle over the candidate set; see the module docstring."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[tuple[str, ...], int] = {}

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        turn = self._turn.get(pool.ids, 0)
        self._turn[pool.ids] = turn + 1
        node = pool.nodes[turn % len(pool.nodes)]
        return pool.choice(node, f"round-robin turn {turn % len(pool.nodes) + 1}/{len(pool.nodes)}")

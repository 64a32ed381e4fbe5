"""Least load (the router's original policy): join-the-shortest-queue among the candidates.

Load = queue depth + in-flight (+ requests this router sent since the node's last heartbeat):
join-the-shortest-queue (Winston, "Optimality of the shortest line discipline", J. Appl. Prob.
14(1), 1977). Ties go to the lower latency (as in Envoy's least-request balancer), then to the
hospital id so the choice is deterministic. The candidate set — department match first — is the
shared one of :func:`fedllm.services.router.strategy.candidates`.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.strategy import Candidates, Choice, PoolStrategy


def _rank(node: NodeInfo) -> tuple[int, float, str]:
    return (node.load, node.latency_ms, node.hospital_id)


class DepartmentLeastLoad(PoolStrategy):
    """Department match first, then least load; see the module docstring."""

    name = "least_load"

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        node = min(pool.nodes, key=_rank)
        return pool.choice(node, f"least loaded (load {node.load})")

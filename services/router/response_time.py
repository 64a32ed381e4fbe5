"""Weighted response time: the lowest expected wait, from each node's EWMA latency and load.

Cost of a node = EWMA latency × (load + 1): the time the request would wait behind the node's
queue and its own service, each at the node's recent pace. This is the "peak EWMA" balancer of
Twitter's Finagle and Linkerd (Buoyant, "Beyond Round Robin: Load Balancing for Latency", 2016),
and the same idea as Envoy's weighted least-request balancer, whose effective weight is
`weight / (active_requests + 1) ^ active_request_bias` with a weight inversely proportional to
latency (Envoy docs, "Supported load balancers"). A node that has not reported a latency yet is
costed at the mean latency of those that have (1 ms if none has), so it is tried, not shunned.
Ties go to the lower load, then to the hospital id.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.strategy import Candidates, Choice, PoolStrategy


def latency_or_mean(nodes: Sequence[NodeInfo]) -> dict[str, float]:
    """Each node's latency (ms), with unknown (0) replaced by the mean of the known, or 1 ms."""
    known = [n.latency_ms for n in nodes if n.latency_ms > 0]
    fallback = sum(known) / len(known) if known else 1.0
    return {n.hospital_id: n.latency_ms if n.latency_ms > 0 else fallback for n in nodes}


def expected_waits(nodes: Sequence[NodeInfo]) -> dict[str, float]:
    """Each node's expected wait (ms): latency (unknown → the mean) × (load + 1)."""
    latency = latency_or_mean(nodes)
    return {n.hospital_id: latency[n.hospital_id] * (n.load + 1) for n in nodes}


class WeightedResponseTime(PoolStrategy):
    """Least EWMA latency × (load + 1); see the module docstring."""

    name = "response_time"

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        wait = expected_waits(pool.nodes)

        def cost(n: NodeInfo) -> tuple[float, int, str]:
            return (wait[n.hospital_id], n.load, n.hospital_id)

        node = min(pool.nodes, key=cost)
        return pool.choice(
            node, f"least expected wait ({cost(node)[0]:.0f} ms = EWMA × (load {node.load} + 1))"
        )

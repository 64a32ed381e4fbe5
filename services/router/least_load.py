"""Department affinity first, then join-the-shortest-queue.

Among healthy nodes (restricted to `request.hospitals` when the request names any, and never a
node already tried) prefer those that serve the request's department — that is where the data
is — then the least-loaded one: join-the-shortest-queue (Winston, "Optimality of the shortest
line discipline", J. Appl. Prob. 14(1), 1977), with load = queue depth + in-flight (+ requests
this router sent since the node's last heartbeat). Ties go to the lower recent latency (as in
Envoy's least-request balancer), then to the hospital id so the choice is deterministic. When no
eligible node serves the department, the least-loaded eligible node is chosen and the reason
says so.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from services.router.registry import NodeInfo
from services.router.strategy import Choice


def _rank(node: NodeInfo) -> tuple[int, float, str]:
    return (node.load, node.recent_latency_ms, node.hospital_id)


class DepartmentLeastLoad:
    """Department match first, then least load; see the module docstring."""

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        wanted = set(request.get("hospitals") or ())
        eligible = [
            n for n in nodes
            if n.healthy and n.hospital_id not in exclude
            and (not wanted or n.hospital_id in wanted)
        ]
        if not eligible:
            return None
        department = request.get("department", "")
        matching = [n for n in eligible if department in n.departments]
        if matching:
            node = min(matching, key=_rank)
            return Choice(node, f"serves {department}; least loaded (load {node.load})")
        node = min(eligible, key=_rank)
        return Choice(
            node, f"no eligible node serves {department}; least loaded (load {node.load})"
        )

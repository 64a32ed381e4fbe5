"""Privacy-aware placement: among the candidates, prefer the hospitals whose data-set budget has
the most room, so that no hospital's patients are exhausted first.

Each hospital keeps a lifetime ledger of what queries over its records have spent; its heartbeat
reports only a coarse public level of the room left (`budget_room`: 4 = 75 % or more … 1 = under
25 %, 0 = exhausted, which leaves the candidate set; -1 = not reported). The cost of a node is
its expected wait — EWMA latency × (load + 1), as in
:mod:`services.router.response_time` — multiplied by a pressure that doubles for every level of
room the hospital has lost (:func:`budget_pressure`). So a hospital with half the room must be
four times faster to win, and load still spreads: a pure "most room first" order would send every
request to one hospital until its level dropped. The idea is water-filling of a shared resource
(max–min fairness, Bertsekas & Gallager, "Data Networks", §6.5.2) over a coarse signal; the
level buckets keep the ledger's exact figure at the hospital.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from services.router.registry import NodeInfo
from services.router.response_time import latency_or_mean
from services.router.strategy import Choice, candidates

ROOM_LEVELS = 4


def budget_pressure(node: NodeInfo) -> float:
    """1 at full room (or unknown), doubling per level lost: 1, 2, 4, 8 for levels 4 … 1."""
    level = node.budget_room
    if level < 0:
        return 1.0
    return float(2 ** (ROOM_LEVELS - min(max(level, 1), ROOM_LEVELS)))


class PrivacyAware:
    """Expected wait × budget pressure; see the module docstring."""

    name = "privacy_aware"

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        pool = candidates(request, nodes, exclude=exclude)
        if pool is None:
            return None
        latency = latency_or_mean(pool.nodes)

        def cost(n: NodeInfo) -> tuple[float, int, int, str]:
            wait = latency[n.hospital_id] * (n.load + 1)
            return (wait * budget_pressure(n), -n.budget_room, n.load, n.hospital_id)

        node = min(pool.nodes, key=cost)
        return pool.choice(
            node, f"budget room level {node.budget_room}, load {node.load}: "
                  f"least wait × pressure ({cost(node)[0]:.0f})"
        )

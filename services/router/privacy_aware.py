"""Privacy-aware placement: among the candidates, prefer the hospitals whose data-set budget has
the most room, so that no hospital's patients are exhausted first.

Two public signals say how much of a hospital's data-set budget is used:
- its heartbeat's coarse `budget_room` level (4 = 75 % or more left … 1 = under 25 %, 0 =
  exhausted, which leaves the candidate set; -1 = not reported), which covers every router and
  the hospital's whole lifetime, but moves only every quarter of the budget;
- the ε this router has reserved there (`routed_epsilon`, from the accountant's reservations,
  public), which is fine-grained but only what this router has sent since it started.

:func:`budget_pressures` turns them into one factor per node: ×3 per room level lost, times
(share of routed ε over the mean share of the alive nodes)^:data:`SHARE_EXPONENT` when above 1
(a prior of :data:`SHARE_PRIOR` ε keeps the first requests from swinging it). The cost of a node
is its expected wait — EWMA latency × (load + 1), as in :mod:`fedllm.services.router.response_time` —
times that pressure: a hospital used twice its share must be 2^SHARE_EXPONENT times faster to
win, and load still spreads (a pure "most room first" order would send every request to one
hospital until its level dropped). This is water-filling of a shared resource (max–min
fairness, Bertsekas & Gallager, "Data Networks", §6.5.2) over public signals only; the ledger's
exact figure stays at the hospital.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.response_time import expected_waits
from fedllm.services.router.strategy import Candidates, Choice, PoolStrategy

ROOM_LEVELS = 4
LEVEL_FACTOR = 3.0  # chosen in bench/routing_sim.py: 2 drained the near-cap hospital, 4 cost p95
SHARE_EXPONENT = 3.0
SHARE_PRIOR = 10.0  # ε


def level_pressure(node: NodeInfo) -> float:
    """1 at full room (or unknown), ×LEVEL_FACTOR per level lost: 1, 3, 9, 27 for levels 4 … 1."""
    level = node.budget_room
    if level < 0:
        return 1.0
    return LEVEL_FACTOR ** (ROOM_LEVELS - min(max(level, 1), ROOM_LEVELS))


def budget_pressures(nodes: Sequence[NodeInfo]) -> dict[str, float]:
    """Each node's budget pressure (≥ 1; see the module docstring), relative to `nodes`."""
    if not nodes:
        return {}
    mean = sum(n.routed_epsilon for n in nodes) / len(nodes)
    return {
        n.hospital_id: level_pressure(n)
        * max(1.0, (n.routed_epsilon + SHARE_PRIOR) / (mean + SHARE_PRIOR)) ** SHARE_EXPONENT
        for n in nodes
    }


class PrivacyAware(PoolStrategy):
    """Expected wait × budget pressure; see the module docstring."""

    name = "privacy_aware"

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        wait = expected_waits(pool.nodes)
        pressure = budget_pressures([n for n in nodes if n.eligible])

        def cost(n: NodeInfo) -> tuple[float, int, int, str]:
            h = n.hospital_id
            return (wait[h] * pressure[h], -n.budget_room, n.load, h)

        node = min(pool.nodes, key=cost)
        return pool.choice(
            node,
            f"budget room level {node.budget_room}, pressure "
            f"{pressure[node.hospital_id]:.2f}, load {node.load}: least wait × pressure",
        )

"""Power of two choices: sample two candidates at random, take the less loaded.

Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE Trans. Parallel
Distrib. Syst. 12(10), 2001: two random probes cut the maximum queue from Θ(log n / log log n)
to Θ(log log n) while reading only two nodes' state — robust when load reports are stale,
because it does not herd every request onto the one node that looked idlest at the last
heartbeat. Load ties go to the lower latency, then to the hospital id. The generator is seeded,
so a run is reproducible.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.strategy import Candidates, Choice, PoolStrategy


class PowerOfTwoChoices(PoolStrategy):
    """The less loaded of two random candidates; see the module docstring."""

    name = "power_of_two"

    def __init__(self, *, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        probes = self._rng.sample(pool.nodes, k=min(2, len(pool.nodes)))
        node = min(probes, key=lambda n: (n.load, n.latency_ms, n.hospital_id))
        probed = " vs ".join(f"{n.hospital_id} (load {n.load})" for n in probes)
        return pool.choice(node, f"two choices: {probed}")

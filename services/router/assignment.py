"""Batch assignment optimiser: place the requests of one short batching window jointly.

The honest form of the design's "quantum-inspired planner": a minimum-cost bipartite matching of
requests to node *slots*, solved exactly with the Hungarian method
(`scipy.optimize.linear_sum_assignment`; Kuhn 1955, Crouse 2016 for the rectangular solver).
Node n offers slots j = 0, 1, … (the j-th request of this batch placed on it); the cost of
request r in slot (n, j) is

    priority_weight(r) × expected completion (n, j)  +  privacy_weight × pressure(n) × L̄

- expected completion (n, j) = latency_n × (load_n + j + 1): the queue ahead, the j requests of
  this batch placed before it, and its own service, at the node's EWMA pace (unknown latency =
  the mean of the known, as in :mod:`fedllm.services.router.response_time`);
- priority_weight: high 4, normal 1, low 0.25 — high-priority requests take the earliest slots;
- pressure(n) = :func:`fedllm.services.router.privacy_aware.budget_pressures` − 1 (0 for a hospital at
  full room and at most its share of routed ε; it grows per room level lost and with the share)
  times the mean candidate latency L̄, so it is measured in the same unit as the wait: a
  hospital whose budget is under more pressure must save that many service times to be chosen.

A request may only take slots of its own candidate set
(:func:`fedllm.services.router.strategy.candidates`). Because slot costs grow with j, the matching fills
each node's slots in order. Retries (one request, with nodes to exclude) are a batch of one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from fedllm.services.router.privacy_aware import budget_pressures
from fedllm.services.router.registry import NodeInfo
from fedllm.services.router.response_time import latency_or_mean
from fedllm.services.router.strategy import Candidates, Choice, candidates

PRIORITY_WEIGHT = {"high": 4.0, "normal": 1.0, "low": 0.25}
_INFEASIBLE = 1e18


class BatchAssignment:
    """Joint placement by minimum-cost assignment; see the module docstring."""

    name = "assignment"

    def __init__(self, *, privacy_weight: float = 1.0) -> None:
        if not privacy_weight >= 0:
            raise ValueError(f"privacy_weight must be >= 0, got {privacy_weight}")
        self.privacy_weight = privacy_weight

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        return self._assign([request], nodes, [exclude])[0]

    def choose_batch(
        self, requests: Sequence[Mapping[str, Any]], nodes: Sequence[NodeInfo]
    ) -> list[Choice | None]:
        return self._assign(requests, nodes, [() for _ in requests])

    def _assign(
        self,
        requests: Sequence[Mapping[str, Any]],
        nodes: Sequence[NodeInfo],
        excludes: Sequence[Collection[str]],
    ) -> list[Choice | None]:
        pools: list[Candidates | None] = [
            candidates(r, nodes, exclude=x) for r, x in zip(requests, excludes, strict=True)
        ]
        used = sorted(
            {n.hospital_id: n for p in pools if p for n in p.nodes}.values(),
            key=lambda n: n.hospital_id,
        )
        if not used:
            return [None] * len(requests)
        latency = latency_or_mean(used)
        mean_latency = sum(latency.values()) / len(latency)
        slots = len(requests)
        column = {n.hospital_id: i for i, n in enumerate(used)}
        # completion[n, j] and pressure[n] for every used node and slot
        completion = np.array(
            [[latency[n.hospital_id] * (n.load + j + 1) for j in range(slots)] for n in used]
        )
        pressures = budget_pressures([n for n in nodes if n.eligible])
        pressure = np.array(
            [self.privacy_weight * (pressures[n.hospital_id] - 1.0) * mean_latency for n in used]
        )
        cost = np.full((len(requests), len(used) * slots), _INFEASIBLE)
        for i, (request, pool) in enumerate(zip(requests, pools, strict=True)):
            if pool is None:
                continue
            weight = PRIORITY_WEIGHT.get(str(request.get("priority", "normal")), 1.0)
            for n in pool.nodes:
                k = column[n.hospital_id]
                cost[i, k * slots : (k + 1) * slots] = weight * completion[k] + pressure[k]
        rows, cols = linear_sum_assignment(cost)
        out: list[Choice | None] = [None] * len(requests)
        for i, c in zip(rows, cols, strict=True):
            pool = pools[i]
            if pool is None or cost[i, c] >= _INFEASIBLE:
                continue
            k, j = divmod(int(c), slots)
            node = used[k]
            out[i] = pool.choice(
                node,
                f"assignment over {len(requests)} request(s): slot {j + 1} "
                f"(expected completion {completion[k, j]:.0f} ms, "
                f"budget room level {node.budget_room})",
            )
        return out

"""The routing-strategy interface: pick one node for a request, or None.

Strategies are pure and live one per module (like Flower's `flwr/server/strategy/`), so a new
policy is a new file, not a branch in the service. Every strategy draws from the same candidate
set (:func:`candidates`), so they differ only in how they choose, never in what is allowed:

- a node is a candidate when it is alive (the registry's TTL), healthy, not failing (error rate
  under :data:`~fedllm.services.router.registry.MAX_ERROR_RATE`), has data-set budget left (budget room
  not 0), is not already tried for this request, and is among `request.hospitals` when the
  request names any;
- among those, the nodes that serve the request's department are preferred (that is where the
  data is); when none does, every candidate stays in the set and the reason says so.

A strategy that can place several requests at once jointly (the assignment optimiser) also
implements :class:`BatchRoutingStrategy`; the dispatcher gives it the requests that arrived in
one batching window.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from fedllm.services.router.registry import NodeInfo


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen node, why, and the candidate set it was chosen from (all audited)."""

    node: NodeInfo
    reason: str
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Candidates:
    """The nodes a request may go to, and whether they serve its department."""

    nodes: tuple[NodeInfo, ...]
    department: str
    serve_department: bool

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(n.hospital_id for n in self.nodes)

    def because(self, why: str) -> str:
        """`why`, prefixed with whether the set serves the department (for the audit reason)."""
        if self.serve_department:
            return f"serves {self.department}; {why}"
        return f"no eligible node serves {self.department}; {why}"

    def choice(self, node: NodeInfo, why: str) -> Choice:
        return Choice(node, self.because(why), self.ids)


def candidates(
    request: Mapping[str, Any], nodes: Sequence[NodeInfo], *, exclude: Collection[str] = ()
) -> Candidates | None:
    """The candidate set for `request` (see the module docstring), or None when it is empty."""
    wanted = set(request.get("hospitals") or ())
    eligible = [
        n
        for n in nodes
        if n.eligible and n.hospital_id not in exclude and (not wanted or n.hospital_id in wanted)
    ]
    if not eligible:
        return None
    department = str(request.get("department", ""))
    matching = [n for n in eligible if department in n.departments]
    pool = matching or eligible
    return Candidates(tuple(sorted(pool, key=lambda n: n.hospital_id)), department, bool(matching))


class PoolStrategy:
    """Base of the one-request strategies: draw the shared candidate set, then :meth:`pick`."""

    name: str

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        pool = candidates(request, nodes, exclude=exclude)
        return None if pool is None else self.pick(pool, nodes)

    def pick(self, pool: Candidates, nodes: Sequence[NodeInfo]) -> Choice:
        """Choose among `pool` (never empty); `nodes` is every node alive, for context."""
        raise NotImplementedError


class RoutingStrategy(Protocol):
    """Choose a node for `request` (an InferenceRequest record) among `nodes`."""

    name: str

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None:
        """A node not in `exclude`, or None when nothing is eligible."""
        ...


@runtime_checkable
class BatchRoutingStrategy(Protocol):
    """A strategy that places the requests of one batching window jointly."""

    name: str

    def choose(
        self,
        request: Mapping[str, Any],
        nodes: Sequence[NodeInfo],
        *,
        exclude: Collection[str] = (),
    ) -> Choice | None: ...

    def choose_batch(
        self, requests: Sequence[Mapping[str, Any]], nodes: Sequence[NodeInfo]
    ) -> list[Choice | None]:
        """One choice (or None) per request, in order."""
        ...

"""What the router's two state machines share (pure): the actions they return, the state they
keep, and the bookkeeping of finished requests. :class:`~fedllm.services.router.dispatcher.Dispatcher`
puts them together: :mod:`~fedllm.services.router.single_node` (one node at a time, retry,
hedging) and :mod:`~fedllm.services.router.fan_out` (aggregates sent to several hospitals).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedllm.common.residency import RegionPolicy
from fedllm.schemas.records import InferenceRequest, InferenceResult
from fedllm.services.router.registry import NodeInfo, NodeRegistry
from fedllm.services.router.strategy import RoutingStrategy

SERVICE = "router"


@dataclass(frozen=True, slots=True)
class Send:
    """Produce `record` (Avro `schema`) to `topic` with `key`."""

    topic: str
    schema: str
    record: Mapping[str, Any]  # a record of `schema` (fedllm.schemas.records)
    key: str


@dataclass(frozen=True, slots=True)
class Audit:
    """Emit an AuditEvent (see `fedllm.common.audit.emit`)."""

    action: str
    id_parts: tuple[object, ...]
    fields: dict[str, Any]


Action = Send | Audit


@dataclass(slots=True)
class InFlight:
    """A routed request awaiting its node's answer."""

    request: InferenceRequest
    reserved_epsilon: float
    delta: float
    hospital_id: str
    attempt: int
    attempt_deadline_ms: int
    tried: list[str] = field(default_factory=list)
    attempt_started_ms: int = 0
    hedge_hospital_id: str = ""  # a hedge attempt running beside the current one
    hedge_attempt: int = 0
    hedge_deadline_ms: int = 0
    reserved_rho: float = 0.0  # the accountant's ρ, passed on to the nodes (0: legacy decision)


@dataclass(slots=True)
class FanOut:
    """An aggregate request sent to several hospitals at once, awaiting their parts."""

    request: InferenceRequest
    reserved_epsilon: float
    delta: float
    hospitals: list[str]
    deadline_ms: int
    routed_at_ms: int
    parts: dict[str, InferenceResult] = field(default_factory=dict)  # hospital -> its result
    reserved_rho: float = 0.0  # the accountant's ρ, passed on to the nodes (0: legacy decision)

    @property
    def missing(self) -> list[str]:
        return [h for h in self.hospitals if h not in self.parts]


class DispatchState:
    """The state both machines read and write (set by the dispatcher's ``__init__``)."""

    registry: NodeRegistry
    strategy: RoutingStrategy
    node_timeout_ms: int
    finished_memory: int
    in_flight: dict[str, InFlight]
    fan_outs: dict[str, FanOut]
    _finished: OrderedDict[str, None]
    hedge: bool
    regions: RegionPolicy
    consensus_k: int
    population: dict[str, int]
    _answer_ms: deque[int]

    def _nodes(self, request: InferenceRequest, now_ms: int) -> list[NodeInfo]:
        """The live nodes `request` may be routed to (data residency applied)."""
        return [
            n for n in self.registry.alive(now_ms) if self.regions.permits(request, n.hospital_id)
        ]

    def _finish(self, request_id: str) -> None:
        self.fan_outs.pop(request_id, None)
        self.in_flight.pop(request_id, None)
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)

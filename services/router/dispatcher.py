"""The router's state machine (pure): decisions, node results, heartbeats and clock ticks in;
actions (messages to send, audit events to emit) out.

Two machines share its state (:mod:`~fedllm.services.router.machine`): single-node requests
with their retry and hedging (:mod:`~fedllm.services.router.single_node`), and fan-out
aggregates answered in parts by several hospitals (:mod:`~fedllm.services.router.fan_out`). The
dispatcher admits each approved decision into one of them and hands every input to the one that
holds the request. Everything is idempotent by request id: replayed decisions and duplicate
answers change nothing.

Decisions may arrive in batches (:meth:`Dispatcher.on_decisions`, one batching window of the
service): a strategy that places requests jointly (:class:`BatchRoutingStrategy`, the
assignment optimiser) gets them all at once; any other routes them one by one.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence

from fedllm.common.residency import RegionPolicy
from fedllm.common.results import ANSWER, COMBINED, VERDICT, result_kind
from fedllm.schemas.records import BudgetDecision, InferenceResult, NodeHeartbeat
from fedllm.services.router.fan_out import FanOuts
from fedllm.services.router.machine import SERVICE, Action, Audit, FanOut, InFlight, Send
from fedllm.services.router.registry import NodeInfo, NodeRegistry
from fedllm.services.router.single_node import (
    HEDGE_MIN_SAMPLES,
    HEDGE_PERCENTILE,
    MAX_ATTEMPTS,
    SingleNode,
)
from fedllm.services.router.strategy import BatchRoutingStrategy, Choice, RoutingStrategy

__all__ = [
    "HEDGE_MIN_SAMPLES",
    "HEDGE_PERCENTILE",
    "MAX_ATTEMPTS",
    "PRIORITY_ORDER",
    "SERVICE",
    "Action",
    "Audit",
    "Dispatcher",
    "FanOut",
    "InFlight",
    "Send",
]

#: Order in which a batch of decisions is routed (stable within a priority).
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}


class Dispatcher(SingleNode, FanOuts):
    """Routes approved decisions and supervises attempts. Time is always passed in."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        strategy: RoutingStrategy,
        node_timeout_s: float,
        finished_memory: int = 100_000,
        hedge: bool = False,
        regions: RegionPolicy | None = None,
        consensus_k: int = 2,
        population: Mapping[str, int] | None = None,
    ) -> None:
        if node_timeout_s <= 0:
            raise ValueError(f"node_timeout_s must be positive, got {node_timeout_s}")
        if finished_memory < 1:
            raise ValueError("finished_memory must be at least 1")
        self.registry = registry
        self.strategy = strategy
        self.node_timeout_ms = int(node_timeout_s * 1000)
        self.finished_memory = finished_memory
        self.in_flight: dict[str, InFlight] = {}
        self.fan_outs: dict[str, FanOut] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self.hedge = hedge
        self.regions = regions or RegionPolicy()  # default: no residency restriction
        if consensus_k < 2:
            raise ValueError("consensus_k must be at least 2")
        self.consensus_k = consensus_k
        self.population = dict(population or {})  # public, configured: consensus rates
        self._answer_ms: deque[int] = deque(maxlen=256)  # recent answer times, for the p95

    def on_decision(self, decision: BudgetDecision, *, now_ms: int) -> list[Action]:
        """Route an approved decision; rejected, replayed or finished ones are ignored."""
        return self.on_decisions([decision], now_ms=now_ms)

    def on_decisions(self, decisions: Sequence[BudgetDecision], *, now_ms: int) -> list[Action]:
        """Route a batching window's decisions; a batch strategy places them jointly."""
        actions: list[Action] = []
        entries: list[InFlight] = []
        seen: set[str] = set()
        for decision in decisions:
            rid = decision["request_id"]
            if rid in seen:
                continue
            seen.add(rid)
            admitted = self._admit(decision, now_ms=now_ms)
            if isinstance(admitted, InFlight):
                entries.append(admitted)
            else:
                actions += admitted
        # Priority: a window's high requests are placed (and sent) first, on the best nodes.
        entries.sort(key=lambda e: PRIORITY_ORDER.get(str(e.request.get("priority")), 1))
        choices: Sequence[Choice | None] = [None] * len(entries)
        routable = [  # residency-restricted requests are placed one by one, on their nodes
            e
            for e in entries
            if now_ms < int(e.request["deadline_ms"]) and self.regions.allowed(e.request) is None
        ]
        if isinstance(self.strategy, BatchRoutingStrategy) and len(routable) > 1:
            placed = self.strategy.choose_batch(
                [e.request for e in routable], self.registry.alive(now_ms)
            )
            by_id = {e.request["request_id"]: c for e, c in zip(routable, placed, strict=True)}
            choices = [by_id.get(e.request["request_id"]) for e in entries]
        for entry, choice in zip(entries, choices, strict=True):
            actions += self._attempt(entry, now_ms=now_ms, why="", choice=choice)
        return actions

    def _admit(self, decision: BudgetDecision, *, now_ms: int) -> InFlight | list[Action]:
        """A new single-node entry to route, or the actions for a fan-out (or nothing)."""
        if not decision["approved"]:
            return []
        request = decision["request"].copy()
        request_id = request["request_id"]
        if (
            request_id in self.in_flight
            or request_id in self.fan_outs
            or request_id in self._finished
        ):
            return []
        if request.get("require_consensus"):
            targets, why = self._consensus_targets(request, now_ms=now_ms)
            fan = FanOut(
                request=request,
                reserved_epsilon=float(decision["reserved_epsilon"]),
                delta=float(decision["delta"]),
                reserved_rho=float(decision.get("reserved_rho") or 0.0),
                hospitals=targets,
                deadline_ms=min(now_ms + self.node_timeout_ms, int(request["deadline_ms"])),
                routed_at_ms=now_ms,
            )
            if why:  # never a silent single answer
                return self._fail_fan_out(fan, why, now_ms=now_ms)
            return self._fan_out(fan, now_ms=now_ms)
        fan_targets = self._fan_out_targets(request, now_ms=now_ms)
        if fan_targets is not None:
            fan = FanOut(
                request=request,
                reserved_epsilon=float(decision["reserved_epsilon"]),
                delta=float(decision["delta"]),
                reserved_rho=float(decision.get("reserved_rho") or 0.0),
                hospitals=fan_targets,
                deadline_ms=min(now_ms + self.node_timeout_ms, int(request["deadline_ms"])),
                routed_at_ms=now_ms,
            )
            return self._fan_out(fan, now_ms=now_ms)
        if "*" in (request.get("hospitals") or ()):
            request["hospitals"] = []  # "*" with fewer than two nodes alive: router chooses
        return InFlight(
            request=request,
            reserved_epsilon=float(decision["reserved_epsilon"]),
            delta=float(decision["delta"]),
            reserved_rho=float(decision.get("reserved_rho") or 0.0),
            hospital_id="",
            attempt=0,
            attempt_deadline_ms=0,
        )

    def on_node_result(self, result: InferenceResult, *, now_ms: int) -> list[Action]:
        """A node's answer closes the request, unless it is a failure of the current attempt,
        which triggers the retry; a part goes to its fan-out. A router's own record (a verdict
        or a combined answer, e.g. read back after a restart) ends the request with nothing
        sent. Stale or unknown answers are ignored."""
        request_id = result["request_id"]
        kind = result_kind(result)
        if kind in (VERDICT, COMBINED):
            if request_id in self.in_flight or request_id in self.fan_outs:
                self._finish(request_id)
            return []
        fan = self.fan_outs.get(request_id)
        if fan is not None:
            return self._on_part(fan, result, now_ms=now_ms)
        entry = self.in_flight.get(request_id)
        if entry is None or kind != ANSWER:
            return []
        return self._on_answer(entry, result, now_ms=now_ms)

    def on_heartbeat(self, heartbeat: NodeHeartbeat, *, now_ms: int) -> list[Action]:
        """Update the registry; audit a join."""
        if not self.registry.observe(heartbeat, now_ms=now_ms):
            return []
        node = self.registry.get(heartbeat["hospital_id"], now_ms=now_ms)
        assert node is not None
        return [
            Audit(
                "node.joined",
                (node.hospital_id, now_ms),
                {
                    "hospital_id": node.hospital_id,
                    "outcome": "joined",
                    "departments": ",".join(node.departments),
                    "model": node.model,
                    "device": node.device,
                },
            )
        ]

    def tick(self, *, now_ms: int) -> list[Action]:
        """Expire silent nodes (re-routing what they held) and overdue attempts."""
        actions: list[Action] = []
        for node in self.registry.expire(now_ms=now_ms):
            actions.append(self._node_left(node, now_ms=now_ms))
            for entry in [
                e for e in self.in_flight.values() if e.hedge_hospital_id == node.hospital_id
            ]:
                self._drop_hedge(entry)
            for entry in [e for e in self.in_flight.values() if e.hospital_id == node.hospital_id]:
                if entry.hedge_hospital_id:
                    self._promote_hedge(entry)
                    continue
                why = f"node {node.hospital_id} left the registry"
                actions += self._attempt(entry, now_ms=now_ms, why=why)
            for fan in [f for f in self.fan_outs.values() if node.hospital_id in f.missing]:
                why = f"node {node.hospital_id} left the registry"
                actions += self._fail_fan_out(fan, why, now_ms=now_ms)
        for entry in [e for e in self.in_flight.values() if now_ms >= e.attempt_deadline_ms]:
            if entry.hedge_hospital_id and now_ms < entry.hedge_deadline_ms:
                self._promote_hedge(entry)
                continue
            why = f"node {entry.hospital_id} did not answer attempt {entry.attempt} in time"
            actions += self._attempt(entry, now_ms=now_ms, why=why)
        actions += self._hedge_overdue(now_ms=now_ms)
        for fan in [f for f in self.fan_outs.values() if now_ms >= f.deadline_ms]:
            why = f"{','.join(fan.missing)} did not answer in time"
            actions += self._fail_fan_out(fan, why, now_ms=now_ms)
        return actions

    def on_send_failed(self, request_id: str, hospital_id: str, *, now_ms: int) -> list[Action]:
        """The RoutedRequest to `hospital_id` could not be produced: abandon that attempt."""
        fan = self.fan_outs.get(request_id)
        if fan is not None and hospital_id in fan.missing:
            return self._fail_fan_out(fan, f"could not send to {hospital_id}", now_ms=now_ms)
        entry = self.in_flight.get(request_id)
        if entry is None or entry.hospital_id != hospital_id:
            return []
        return self._attempt(entry, now_ms=now_ms, why=f"could not send to {hospital_id}")

    def is_finished(self, request_id: str) -> bool:
        return request_id in self._finished

    def _node_left(self, node: NodeInfo, *, now_ms: int) -> Audit:
        return Audit(
            "node.left",
            (node.hospital_id, node.last_seen_ms),
            {
                "hospital_id": node.hospital_id,
                "outcome": "left",
                "reason": f"no heartbeat for {now_ms - node.last_seen_ms} ms",
                "held_requests": sum(
                    1 for e in self.in_flight.values() if e.hospital_id == node.hospital_id
                ),
            },
        )

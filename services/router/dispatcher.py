"""The router's state machine (pure): decisions, node results, heartbeats and clock ticks in;
actions (messages to send, audit events to emit) out.

A request gets at most `MAX_ATTEMPTS` node attempts. An attempt ends with the node's answer, or
is abandoned when the node misses the attempt deadline, answers "failed"/"timeout", or drops out
of the registry; then the request is retried once on a node not yet tried, else failed with an
InferenceResult on the node-results topic (the accountant refunds the reservation on it).
Everything is idempotent by request id: replayed decisions and duplicate answers change nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedllm.common import topics
from services.router.registry import NodeInfo, NodeRegistry
from services.router.strategy import RoutingStrategy

MAX_ATTEMPTS = 2
SERVICE = "router"


@dataclass(frozen=True, slots=True)
class Send:
    """Produce `record` (Avro `schema`) to `topic` with `key`."""

    topic: str
    schema: str
    record: dict[str, Any]
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

    request: dict[str, Any]
    reserved_epsilon: float
    delta: float
    hospital_id: str
    attempt: int
    attempt_deadline_ms: int
    tried: list[str] = field(default_factory=list)


class Dispatcher:
    """Routes approved decisions and supervises attempts. Time is always passed in."""

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        strategy: RoutingStrategy,
        node_timeout_s: float,
        finished_memory: int = 100_000,
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
        self._finished: OrderedDict[str, None] = OrderedDict()

    # -- inputs ---------------------------------------------------------------------------

    def on_decision(self, decision: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        """Route an approved decision; rejected, replayed or finished ones are ignored."""
        if not decision["approved"]:
            return []
        request = dict(decision["request"])
        request_id = request["request_id"]
        if request_id in self.in_flight or request_id in self._finished:
            return []
        entry = InFlight(
            request=request,
            reserved_epsilon=float(decision["reserved_epsilon"]),
            delta=float(decision["delta"]),
            hospital_id="",
            attempt=0,
            attempt_deadline_ms=0,
        )
        return self._attempt(entry, now_ms=now_ms, why="")

    def on_node_result(self, result: Mapping[str, Any], *, now_ms: int) -> list[Action]:
        """An answer on node-results closes the request, unless it is a failure of the current
        attempt, which triggers the retry. Stale or unknown answers are ignored."""
        request_id = result["request_id"]
        entry = self.in_flight.get(request_id)
        if entry is None:
            return []
        if result["status"] in ("failed", "timeout"):
            stale = result.get("node_id") != entry.hospital_id or result.get("attempt", 0) not in (
                0, entry.attempt)
            if stale:
                return []  # a failure of an attempt already abandoned
            why = f"node {entry.hospital_id} answered {result['status']}: {result.get('reason', '')}"
            return self._attempt(entry, now_ms=now_ms, why=why)
        self._finish(request_id)
        return []

    def on_heartbeat(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> list[Action]:
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
            for entry in [e for e in self.in_flight.values() if e.hospital_id == node.hospital_id]:
                why = f"node {node.hospital_id} left the registry"
                actions += self._attempt(entry, now_ms=now_ms, why=why)
        for entry in [e for e in self.in_flight.values() if now_ms >= e.attempt_deadline_ms]:
            why = f"node {entry.hospital_id} did not answer attempt {entry.attempt} in time"
            actions += self._attempt(entry, now_ms=now_ms, why=why)
        return actions

    def on_send_failed(self, request_id: str, hospital_id: str, *, now_ms: int) -> list[Action]:
        """The RoutedRequest to `hospital_id` could not be produced: abandon that attempt."""
        entry = self.in_flight.get(request_id)
        if entry is None or entry.hospital_id != hospital_id:
            return []
        return self._attempt(entry, now_ms=now_ms, why=f"could not send to {hospital_id}")

    def is_finished(self, request_id: str) -> bool:
        return request_id in self._finished

    # -- internals ------------------------------------------------------------------------

    def _attempt(self, entry: InFlight, *, now_ms: int, why: str) -> list[Action]:
        """Start the next attempt of `entry`, or fail it. `why` explains a retry."""
        request = entry.request
        request_id = request["request_id"]
        if now_ms >= int(request["deadline_ms"]):
            return self._fail(entry, "timeout", why or "request deadline passed before routing",
                              now_ms=now_ms)
        if entry.attempt >= MAX_ATTEMPTS:
            return self._fail(entry, "failed", f"{why}; no attempts left", now_ms=now_ms)
        choice = self.strategy.choose(
            request, self.registry.alive(now_ms), exclude=entry.tried
        )
        if choice is None:
            reason = "no eligible node"
            if request.get("hospitals"):
                reason += f" among {','.join(request['hospitals'])}"
            if entry.tried:
                reason += f" besides {','.join(entry.tried)}"
            return self._fail(entry, "failed", f"{why}; {reason}" if why else reason,
                              now_ms=now_ms)

        previous = entry.hospital_id
        node: NodeInfo = choice.node
        entry.attempt += 1
        entry.hospital_id = node.hospital_id
        entry.tried.append(node.hospital_id)
        entry.attempt_deadline_ms = min(now_ms + self.node_timeout_ms, int(request["deadline_ms"]))
        self.in_flight[request_id] = entry
        self.registry.note_routed(node.hospital_id)

        routed = {
            "request_id": request_id,
            "hospital_id": node.hospital_id,
            "attempt": entry.attempt,
            "reserved_epsilon": entry.reserved_epsilon,
            "delta": entry.delta,
            "deadline_ms": entry.attempt_deadline_ms,
            "routed_at_ms": now_ms,
            "request": request,
        }
        actions: list[Action] = [
            Send(topics.hospital_requests(node.hospital_id), "RoutedRequest", routed, request_id)
        ]
        common = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
        }
        if entry.attempt > 1:
            actions.append(
                Audit(
                    "request.retried",
                    (request_id, entry.attempt),
                    {**common, "hospital_id": node.hospital_id, "reason": why,
                     "attempt": entry.attempt, "previous_hospital_id": previous},
                )
            )
        actions.append(
            Audit(
                "request.routed",
                (request_id, entry.attempt),
                {**common, "hospital_id": node.hospital_id, "reason": choice.reason,
                 "attempt": entry.attempt, "attempt_deadline_ms": entry.attempt_deadline_ms},
            )
        )
        return actions

    def _fail(self, entry: InFlight, status: str, reason: str, *, now_ms: int) -> list[Action]:
        request = entry.request
        request_id = request["request_id"]
        self._finish(request_id)
        result = {
            "request_id": request_id,
            "user_id": request["user_id"],
            "department": request["department"],
            "status": status,
            "reason": reason,
            "node_id": "",
            "attempt": entry.attempt,
            "delta": entry.delta,
            "finished_at_ms": now_ms,
        }
        return [
            Send(topics.NODE_RESULTS, "InferenceResult", result, request["user_id"]),
            Audit(
                "request.route_failed",
                (request_id,),
                {"request_id": request_id, "user_id": request["user_id"],
                 "department": request["department"], "hospital_id": entry.hospital_id,
                 "outcome": status, "reason": reason, "attempt": entry.attempt},
            ),
        ]

    def _finish(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)

    def _node_left(self, node: NodeInfo, *, now_ms: int) -> Audit:
        return Audit(
            "node.left",
            (node.hospital_id, node.last_seen_ms),
            {"hospital_id": node.hospital_id, "outcome": "left",
             "reason": f"no heartbeat for {now_ms - node.last_seen_ms} ms",
             "held_requests": sum(
                 1 for e in self.in_flight.values() if e.hospital_id == node.hospital_id)},
        )

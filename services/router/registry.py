"""Node registry built from NodeHeartbeat records (pure: no I/O, time passed in).

A node is *alive* while its last heartbeat was received less than `ttl_s` ago. The registry
reports joins (first heartbeat, or first after having left) and departures (TTL expiry) so the
service can audit them and re-route whatever a departed node held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedllm.common.heartbeats import HeartbeatRegistry

MAX_ERROR_RATE = 0.5
"""A node whose reported error rate reaches this leaves the candidate set until it recovers."""

PRIORITIES = ("high", "normal", "low")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What the router knows about one hospital node."""

    hospital_id: str
    departments: tuple[str, ...]
    queue_depth: int
    in_flight: int
    recent_latency_ms: float
    model: str
    device: str
    healthy: bool
    last_seen_ms: int
    routed_since_heartbeat: int = 0
    queue_by_priority: tuple[tuple[str, int], ...] = ()
    ewma_latency_ms: float = 0.0
    error_rate: float = 0.0
    budget_room: int = -1  # 0 exhausted … 4 most room; -1 unknown (see node_heartbeat.avsc)
    routed_epsilon: float = 0.0  # reserved ε this router has sent there (public: reservations)

    @property
    def load(self) -> int:
        """Reported queue + in-flight, plus what this router sent since that report."""
        return self.queue_depth + self.in_flight + self.routed_since_heartbeat

    @property
    def latency_ms(self) -> float:
        """The node's EWMA latency when it reports one, else its recent mean latency."""
        return self.ewma_latency_ms if self.ewma_latency_ms > 0 else self.recent_latency_ms

    @property
    def eligible(self) -> bool:
        """Healthy, not failing, and with data-set budget left (or not saying)."""
        return self.healthy and self.error_rate < MAX_ERROR_RATE and self.budget_room != 0

    @classmethod
    def from_heartbeat(cls, heartbeat: Mapping[str, Any], *, seen_ms: int) -> NodeInfo:
        return cls(
            hospital_id=heartbeat["hospital_id"],
            departments=tuple(heartbeat["departments"]),
            queue_depth=int(heartbeat["queue_depth"]),
            in_flight=int(heartbeat["in_flight"]),
            recent_latency_ms=float(heartbeat["recent_latency_ms"]),
            model=heartbeat["model"],
            device=heartbeat.get("device", "cpu"),
            healthy=bool(heartbeat["healthy"]),
            last_seen_ms=seen_ms,
            queue_by_priority=tuple(
                sorted(
                    (str(k), int(v)) for k, v in (heartbeat.get("queue_by_priority") or {}).items()
                )
            ),
            ewma_latency_ms=float(heartbeat.get("ewma_latency_ms", 0.0)),
            error_rate=float(heartbeat.get("error_rate", 0.0)),
            budget_room=int(heartbeat.get("budget_room", -1)),
        )


class NodeRegistry:
    """Alive nodes by hospital id: a :class:`fedllm.common.heartbeats.HeartbeatRegistry` of
    :class:`NodeInfo`, plus what this router sent each node.

    `last_seen_ms` is the router's receive time (so node clock skew does not matter), but a
    heartbeat whose own `sent_at_ms` is already older than the TTL is a replay of history and is
    ignored: it must not resurrect a node.
    """

    def __init__(self, *, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_ms = int(ttl_s * 1000)
        self._nodes: HeartbeatRegistry[NodeInfo] = HeartbeatRegistry(
            ttl_ms=self.ttl_ms, seen_ms=lambda n: n.last_seen_ms
        )
        self._routed: dict[str, float] = {}  # survives departures: the hospital's data stays

    def observe(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> bool:
        """Record a heartbeat; True when the node has just joined (was not alive before)."""
        if now_ms - int(heartbeat["sent_at_ms"]) >= self.ttl_ms:
            return False
        hospital_id = heartbeat["hospital_id"]
        node = NodeInfo.from_heartbeat(heartbeat, seen_ms=now_ms)
        node = replace(node, routed_epsilon=self._routed.get(hospital_id, 0.0))
        return self._nodes.observe(hospital_id, node, now_ms=now_ms)

    def expire(self, *, now_ms: int) -> list[NodeInfo]:
        """Remove and return the nodes not heard from within the TTL."""
        return self._nodes.expire(now_ms=now_ms)

    def alive(self, now_ms: int) -> list[NodeInfo]:
        """Nodes heard from within the TTL, healthy or not, sorted by id."""
        return self._nodes.alive(now_ms)

    def get(self, hospital_id: str, *, now_ms: int) -> NodeInfo | None:
        """The node if alive, else None."""
        return self._nodes.get(hospital_id, now_ms=now_ms)

    def note_routed(self, hospital_id: str, *, epsilon: float = 0.0) -> None:
        """Count a request sent to the node since its last heartbeat (until the next one), and
        the ε reserved for it in the hospital's running total."""
        self._routed[hospital_id] = self._routed.get(hospital_id, 0.0) + epsilon
        node = self._nodes.latest.get(hospital_id)
        if node is not None:
            self._nodes.put(
                hospital_id,
                replace(
                    node,
                    routed_since_heartbeat=node.routed_since_heartbeat + 1,
                    routed_epsilon=self._routed[hospital_id],
                ),
            )

    def leave_now(self, hospital_id: str) -> None:
        """Mark a known node as long silent: the next :meth:`expire` reports it left (and its
        work is re-routed) without waiting for the TTL."""
        node = self._nodes.latest.get(hospital_id)
        if node is not None:
            self._nodes.put(hospital_id, replace(node, last_seen_ms=-(2**62)))

    def ids(self) -> Iterable[str]:
        return tuple(self._nodes.latest)

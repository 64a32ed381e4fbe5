"""Node registry built from NodeHeartbeat records (pure: no I/O, time passed in).

A node is *alive* while its last heartbeat was received less than `ttl_s` ago. The registry
reports joins (first heartbeat, or first after having left) and departures (TTL expiry) so the
service can audit them and re-route whatever a departed node held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

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
    """Alive nodes by hospital id.

    `last_seen_ms` is the router's receive time (so node clock skew does not matter), but a
    heartbeat whose own `sent_at_ms` is already older than the TTL is a replay of history and is
    ignored: it must not resurrect a node.
    """

    def __init__(self, *, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_ms = int(ttl_s * 1000)
        self._nodes: dict[str, NodeInfo] = {}
        self._routed: dict[str, float] = {}  # survives departures: the hospital's data stays

    def observe(self, heartbeat: Mapping[str, Any], *, now_ms: int) -> bool:
        """Record a heartbeat; True when the node has just joined (was not alive before)."""
        if now_ms - int(heartbeat["sent_at_ms"]) >= self.ttl_ms:
            return False
        hospital_id = heartbeat["hospital_id"]
        joined = self.get(hospital_id, now_ms=now_ms) is None
        node = NodeInfo.from_heartbeat(heartbeat, seen_ms=now_ms)
        self._nodes[hospital_id] = replace(node, routed_epsilon=self._routed.get(hospital_id, 0.0))
        return joined

    def expire(self, *, now_ms: int) -> list[NodeInfo]:
        """Remove and return the nodes not heard from within the TTL."""
        gone = [n for n in self._nodes.values() if not self._is_alive(n, now_ms)]
        for node in gone:
            del self._nodes[node.hospital_id]
        return gone

    def alive(self, now_ms: int) -> list[NodeInfo]:
        """Nodes heard from within the TTL, healthy or not, sorted by id."""
        return sorted(
            (n for n in self._nodes.values() if self._is_alive(n, now_ms)),
            key=lambda n: n.hospital_id,
        )

    def get(self, hospital_id: str, *, now_ms: int) -> NodeInfo | None:
        """The node if alive, else None."""
        node = self._nodes.get(hospital_id)
        return node if node is not None and self._is_alive(node, now_ms) else None

    def note_routed(self, hospital_id: str, *, epsilon: float = 0.0) -> None:
        """Count a request sent to the node since its last heartbeat (until the next one), and
        the ε reserved for it in the hospital's running total."""
        self._routed[hospital_id] = self._routed.get(hospital_id, 0.0) + epsilon
        node = self._nodes.get(hospital_id)
        if node is not None:
            self._nodes[hospital_id] = replace(
                node,
                routed_since_heartbeat=node.routed_since_heartbeat + 1,
                routed_epsilon=self._routed[hospital_id],
            )

    def ids(self) -> Iterable[str]:
        return tuple(self._nodes)

    def _is_alive(self, node: NodeInfo, now_ms: int) -> bool:
        return now_ms - node.last_seen_ms < self.ttl_ms

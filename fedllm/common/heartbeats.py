"""The latest heartbeat of every hospital node, and which are alive (pure: time passed in).

One registry for every reader of ``fedllm.heartbeats``: the router keeps its routing view of each
node in it (``services/router/registry.py``), the gateway the raw records for the admin API
(``services/gateway/correlator.py: NodeView``). What is stored per hospital is the caller's
(``T``), and so is the time it was seen (``seen_ms(value)``: the router's receive time, the
gateway's ``sent_at_ms``). A node is *alive* while ``now_ms − seen_ms < ttl_ms``; a later-seen
value replaces an earlier one, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

__all__ = ["HeartbeatRegistry"]

T = TypeVar("T")


class HeartbeatRegistry(Generic[T]):
    """Latest value per hospital id, with liveness against a TTL; optionally bounded (when
    full, a new hospital evicts the one seen longest ago)."""

    def __init__(
        self, *, ttl_ms: int, seen_ms: Callable[[T], int], capacity: int | None = None
    ) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.ttl_ms = ttl_ms
        self.capacity = capacity
        self._seen_ms = seen_ms
        self._latest: dict[str, T] = {}
        self.latest: Mapping[str, T] = MappingProxyType(self._latest)
        """Every hospital's latest value, alive or not (a live read-only view)."""

    def observe(self, hospital_id: str, value: T, *, now_ms: int) -> bool:
        """Keep ``value`` unless the stored one was seen later; True when the hospital has just
        joined (it was not alive at ``now_ms`` before, and now is)."""
        old = self._latest.get(hospital_id)
        if old is not None and self._seen_ms(value) < self._seen_ms(old):
            return False
        joined = old is None or not self.is_alive(old, now_ms=now_ms)
        if old is None and self.capacity is not None and len(self._latest) >= self.capacity:
            del self._latest[min(self._latest, key=lambda h: self._seen_ms(self._latest[h]))]
        self._latest[hospital_id] = value
        return joined and self.is_alive(value, now_ms=now_ms)

    def put(self, hospital_id: str, value: T) -> None:
        """Replace a known hospital's value as is (the caller's own bookkeeping)."""
        if hospital_id not in self._latest:
            raise KeyError(hospital_id)
        self._latest[hospital_id] = value

    def is_alive(self, value: T, *, now_ms: int) -> bool:
        return now_ms - self._seen_ms(value) < self.ttl_ms

    def get(self, hospital_id: str, *, now_ms: int) -> T | None:
        """The hospital's value if it is alive, else None."""
        value = self._latest.get(hospital_id)
        return value if value is not None and self.is_alive(value, now_ms=now_ms) else None

    def alive(self, now_ms: int) -> list[T]:
        """The values of the alive hospitals, by hospital id."""
        return [v for _, v in sorted(self._latest.items()) if self.is_alive(v, now_ms=now_ms)]

    def expire(self, *, now_ms: int) -> list[T]:
        """Remove and return the values of the hospitals not alive at ``now_ms``."""
        gone = [h for h, v in self._latest.items() if not self.is_alive(v, now_ms=now_ms)]
        return [self._latest.pop(h) for h in gone]

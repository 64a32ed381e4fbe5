"""The node's intake: fetched requests wait in a priority queue, so a ``high`` request overtakes
queued ``normal``/``low`` work (FIFO within a priority).

Offsets: a request may finish before an earlier one of its partition, so the committable offset
of a partition is the lowest offset still queued or running (everything below it is answered);
a crash re-delivers only unanswered work, and a replay is idempotent (the ledger).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fedllm.schemas.records import RoutedRequest

__all__ = ["PRIORITY_RANK", "IntakeQueue", "Queued", "priority_of"]

#: Lower rank is served first; an unknown priority counts as ``normal``.
PRIORITY_RANK = {"high": 0, "normal": 1, "low": 2}

T = TypeVar("T")


def priority_of(routed: RoutedRequest | None) -> str:
    """A RoutedRequest's priority (``normal`` when absent or unknown)."""
    inner = routed.get("request") if routed else None
    p = str(inner.get("priority", "normal")) if inner else "normal"
    return p if p in PRIORITY_RANK else "normal"


@dataclass(order=True, slots=True)
class Queued(Generic[T]):
    rank: int
    seq: int
    partition: Any = field(compare=False)
    offset: int = field(compare=False)
    item: T = field(compare=False)


class IntakeQueue(Generic[T]):
    """Priority queue of fetched messages with per-partition commit bookkeeping."""

    def __init__(self) -> None:
        self._heap: list[Queued[T]] = []
        self._seq = itertools.count()
        self._open: dict[Any, set[int]] = {}  # partition -> offsets queued or running
        self._next: dict[Any, int] = {}  # partition -> one past the highest offset seen
        self._committed: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, partition: Any, offset: int, priority: str, item: T) -> None:
        rank = PRIORITY_RANK.get(priority, PRIORITY_RANK["normal"])
        heapq.heappush(self._heap, Queued(rank, next(self._seq), partition, offset, item))
        self._open.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def pop(self) -> Queued[T]:
        """The next request to run: highest priority, then earliest fetched."""
        return heapq.heappop(self._heap)

    def peek(self) -> Queued[T]:
        """What :meth:`pop` would return next, left in the queue."""
        return self._heap[0]

    def done(self, partition: Any, offset: int) -> int | None:
        """Mark a request answered; the offset now safe to commit for its partition, if any."""
        open_ = self._open.get(partition, set())
        open_.discard(offset)
        safe = min(open_) if open_ else self._next.get(partition)
        if safe is None or safe <= self._committed.get(partition, -1):
            return None
        self._committed[partition] = safe
        return safe

    def drop(self, partitions: set[Any]) -> int:
        """Forget queued work of partitions this node no longer owns (rebalanced away)."""
        kept = [q for q in self._heap if q.partition not in partitions]
        dropped = len(self._heap) - len(kept)
        heapq.heapify(kept)
        self._heap = kept
        for p in partitions:
            self._open.pop(p, None)
            self._next.pop(p, None)
            self._committed.pop(p, None)
        return dropped

    def queued_partitions(self) -> set[Any]:
        return {q.partition for q in self._heap}

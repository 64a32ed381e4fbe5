"""What a node's heartbeat says about its health, beyond liveness (pure; no I/O).

- `ewma_latency_ms`, `error_rate`: exponentially weighted over answers, α = :data:`EWMA_ALPHA`
  (the first answer seeds the mean). They describe the node's load and state, and are only as
  record-independent as the record path's shape (fixed prompt lengths; see docs/privacy.md).
- `queue_by_priority`: requests received and not yet answered, by priority.
- `budget_room`: the hospital's data-set budget left, as a coarse public level
  (:func:`budget_room_level`), never the ledger's figure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EWMA_ALPHA = 0.3
EXHAUSTED_BELOW = 0.01  # room fraction under which the level is 0 (no query fits any more)


def budget_room_level(room: float | None) -> int:
    """Bucket the fraction of budget left: 0 exhausted (< 1 %), 1 under 25 %, 2 under 50 %,
    3 under 75 %, 4 otherwise; -1 when the node does not know (no ledger)."""
    if room is None:
        return -1
    if not room >= EXHAUSTED_BELOW:  # NaN fails closed
        return 0
    return min(4, 1 + int(room * 4))


@dataclass(slots=True)
class NodeHealth:
    """Running figures for the heartbeat."""

    ewma_latency_ms: float = 0.0
    error_rate: float = 0.0
    answers: int = 0
    queued: Counter[str] = field(default_factory=Counter)

    def received(self, priority: str) -> None:
        self.queued[priority or "normal"] += 1

    def answered(self, priority: str, *, latency_ms: float, ok: bool) -> None:
        """Fold one answer into the EWMAs and take it off the queue."""
        key = priority or "normal"
        if self.queued[key] > 0:
            self.queued[key] -= 1
        failed = 0.0 if ok else 1.0
        if self.answers == 0:
            self.ewma_latency_ms, self.error_rate = latency_ms, failed
        else:
            self.ewma_latency_ms += EWMA_ALPHA * (latency_ms - self.ewma_latency_ms)
            self.error_rate += EWMA_ALPHA * (failed - self.error_rate)
        self.answers += 1

    def queue_by_priority(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.queued.items()) if v > 0}

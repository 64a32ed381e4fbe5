"""Prometheus metrics of routing decisions, per strategy and per hospital (bounded labels).

Read from the dispatcher's audit actions, so metrics and the audit trail cannot disagree:
`fedllm_router_decisions_total{strategy, hospital, outcome}` counts each routed attempt
(`routed`), retry (`retried`), hedge (`hedged`) and routing failure (`failed`);
`fedllm_router_candidates{strategy}` is the size of the candidate set each choice was made from.
The hospital label is a configured hospital id, `none` (no node chosen) or `other` (anything
else, such as a fan-out's list), so its cardinality is bounded by the configuration.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from fedllm.services.router.dispatcher import Audit

_OUTCOMES = {
    "request.routed": "routed",
    "request.retried": "retried",
    "request.hedged": "hedged",
    "request.route_failed": "failed",
}


class RouterMetrics:
    """The router's collectors, on `registry` (the process-wide one by default)."""

    def __init__(
        self, *, hospitals: Collection[str], registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.hospitals = frozenset(hospitals)
        self.decisions = Counter(
            "fedllm_router_decisions_total",
            "Routing decisions by strategy, hospital and outcome (routed, retried, hedged, "
            "failed).",
            ["strategy", "hospital", "outcome"],
            registry=registry,
        )
        self.candidates = Histogram(
            "fedllm_router_candidates",
            "Size of the candidate set a routing choice was made from.",
            ["strategy"],
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
            registry=registry,
        )

    def hospital_label(self, hospital_id: str) -> str:
        if not hospital_id:
            return "none"
        return hospital_id if hospital_id in self.hospitals else "other"

    def observe(self, action: Audit, *, strategy: str) -> None:
        """Count one of the dispatcher's audit actions (others are ignored)."""
        outcome = _OUTCOMES.get(action.action)
        if outcome is None:
            return
        hospital = self.hospital_label(str(action.fields.get("hospital_id", "")))
        self.decisions.labels(strategy, hospital, outcome).inc()
        if outcome in ("routed", "hedged") and "candidates" in action.fields:
            size = len([c for c in str(action.fields["candidates"]).split(",") if c])
            self.candidates.labels(strategy).observe(size)


_process_metrics: RouterMetrics | None = None


def process_metrics(*, hospitals: Collection[str]) -> RouterMetrics:
    """The process-wide instance (collectors register once per registry)."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = RouterMetrics(hospitals=hospitals)
    return _process_metrics

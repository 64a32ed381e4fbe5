"""Topic names and partition counts: the only addresses services share."""

from __future__ import annotations

REQUESTS = "fedllm.requests"  # InferenceRequest, key user_id; gateway -> accountant
DECISIONS = "fedllm.decisions"  # BudgetDecision, key request_id; accountant -> router
NODE_RESULTS = "fedllm.node-results"  # InferenceResult, key user_id; node/router -> accountant
RESULTS = "fedllm.results"  # InferenceResult, key request_id; accountant -> gateway (terminal)
HEARTBEATS = "fedllm.heartbeats"  # NodeHeartbeat, key hospital_id; node -> router
AUDIT = "fedllm.audit"  # AuditEvent, key request_id or actor; every service -> auditor
BUDGETS = "fedllm.budgets"  # BudgetStatus, key user_id; accountant -> gateway
ADMIN = "fedllm.admin"  # BudgetAdjustment, key subject; gateway -> accountant

# Keyed by user so one accountant instance sees all of a user's events in order.
PARTITIONS: dict[str, int] = {
    REQUESTS: 4,
    NODE_RESULTS: 4,
    DECISIONS: 1,
    RESULTS: 1,
    HEARTBEATS: 1,
    AUDIT: 1,
    BUDGETS: 1,
    ADMIN: 1,
}


def hospital_requests(hospital_id: str) -> str:
    """The topic a hospital's node worker consumes (RoutedRequest)."""
    return f"hospital.{hospital_id}.requests"


def dlq(topic: str) -> str:
    """Dead-letter topic for undecodable messages met on `topic`."""
    return f"{topic}.dlq"


def all_topics(hospital_ids: list[str]) -> dict[str, int]:
    """Every topic the pipeline needs, with partition counts (DLQs included)."""
    topics = dict(PARTITIONS)
    topics.update({hospital_requests(h): 1 for h in hospital_ids})
    topics.update({dlq(t): 1 for t in list(topics)})
    return topics

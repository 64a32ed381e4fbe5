"""Topic names and partition counts: the only addresses services share.

The names below are logical; `scoped(settings, name)` gives the topic on the wire, inside the
deployment's namespace (`Settings.topic_namespace`, env FEDLLM_TOPIC_NAMESPACE; "" = the names as
written, the production default). Tests give each pipeline its own namespace.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedllm.common.config import Settings

REQUESTS = "fedllm.requests"  # InferenceRequest, key user_id; gateway -> accountant
DECISIONS = "fedllm.decisions"  # BudgetDecision, key request_id; accountant -> router
NODE_RESULTS = "fedllm.node-results"  # InferenceResult, key user_id; node/router -> accountant
RESULTS = "fedllm.results"  # InferenceResult, key request_id; accountant -> gateway (terminal)
HEARTBEATS = "fedllm.heartbeats"  # NodeHeartbeat, key hospital_id; node -> router
AUDIT = "fedllm.audit"  # AuditEvent, key request_id or actor; every service -> auditor
BUDGETS = "fedllm.budgets"  # BudgetStatus, key user_id; accountant -> gateway
ADMIN = "fedllm.admin"  # BudgetAdjustment, key subject; gateway -> accountant
CONTROL = "fedllm.control"  # ControlCommand, key target; gateway -> every service (folded)
FL_ROUNDS = "fedllm.fl.rounds"  # FlRoundAnnouncement, key federation_id; coordinator -> trainers
FL_UPDATES = "fedllm.fl.updates"  # FlClientUpdate, key federation_id; trainers -> coordinator
FL_RESULTS = "fedllm.fl.results"  # FlRoundResult, key federation_id; coordinator -> all

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
    CONTROL: 1,
    FL_ROUNDS: 1,
    FL_UPDATES: 1,
    FL_RESULTS: 1,
}


def scoped(settings: Settings, name: str) -> str:
    """The topic `name` (a logical name from this module) inside `settings`' namespace."""
    return settings.topic_namespace + name


def hospital_requests(hospital_id: str) -> str:
    """The topic a hospital's node worker consumes (RoutedRequest)."""
    return f"hospital.{hospital_id}.requests"


REPLIES_PREFIX = "fedllm.replies."  # InferenceResult, key request_id; accountant -> one user
_TOPIC_SAFE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def reply_topic(user_id: str) -> str:
    """The topic a user's terminal results are copied to, when it exists (Kafka clients read
    their answers there; an ACL lets only that user read it). User ids outside Kafka's topic
    alphabet are hashed."""
    if _TOPIC_SAFE.fullmatch(user_id) and not user_id.startswith("sha256-"):
        return REPLIES_PREFIX + user_id
    return REPLIES_PREFIX + "sha256-" + hashlib.sha256(user_id.encode()).hexdigest()[:40]


def dlq(topic: str) -> str:
    """Dead-letter topic for undecodable messages met on `topic`."""
    return f"{topic}.dlq"


def all_topics(hospital_ids: list[str]) -> dict[str, int]:
    """Every topic the pipeline needs, with partition counts (DLQs included)."""
    topics = dict(PARTITIONS)
    topics.update({hospital_requests(h): 1 for h in hospital_ids})
    topics.update({dlq(t): 1 for t in list(topics)})
    return topics

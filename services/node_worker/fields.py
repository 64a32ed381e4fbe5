"""What a node's answer sets: the InferenceResult fields an engine returns (no model stack here,
so the service, the ledger and the routes import it without loading torch)."""

from __future__ import annotations

from typing import Literal, TypedDict, get_args

# The InferenceResult fields an engine's answer may publish (the rest are the node's own).
EngineField = Literal[
    "status",
    "reason",
    "response",
    "is_private",
    "privacy_cost",
    "delta",
    "rdp_orders",
    "rdp_epsilons",
    "tokens",
    "aggregate_json",
    "adapter_hash",
    "adapter_epsilon",
]
ENGINE_FIELDS: tuple[EngineField, ...] = get_args(EngineField)


class AnswerFields(TypedDict, total=False):
    """An engine's answer: the `EngineField`s it sets, and ``records_used``, which never
    leaves the node (tests/node_worker/test_reservation.py keeps the two lists in step)."""

    status: str
    reason: str
    response: str
    is_private: bool
    privacy_cost: float
    delta: float
    rdp_orders: list[float]
    rdp_epsilons: list[float]
    tokens: int
    records_used: int
    aggregate_json: str
    adapter_hash: str
    adapter_epsilon: float


def failed(reason: str) -> AnswerFields:
    """A failure before any mechanism started: nothing released, nothing charged."""
    return {"status": "failed", "reason": reason, "is_private": False}

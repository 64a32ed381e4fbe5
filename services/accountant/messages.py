"""Pure builders of the accountant's outgoing records from ledger outcomes."""

from __future__ import annotations

import json
from typing import Any

from fedllm.common import results
from fedllm.common.kafka import now_ms
from fedllm.common.metrics import record_budget
from fedllm.schemas.records import BudgetDecision, BudgetStatus, InferenceRequest, InferenceResult
from fedllm.services.accountant.ledger import Balance, Outcome

TERMINAL_ACTION = {
    "ok": "request.completed",
    "rejected": "request.rejected",
    "failed": "request.failed",
    "timeout": "request.timeout",
}


def decision(
    request: InferenceRequest, outcome: Outcome, *, reserved_rho: float = 0.0
) -> BudgetDecision:
    """BudgetDecision for a reservation outcome; `reserved_rho` is the ρ of the reserved curve
    (it travels to the nodes on the RoutedRequest)."""
    approved = outcome.state != "rejected"
    return {
        "request_id": request["request_id"],
        "approved": approved,
        "reason": outcome.reason,
        "reserved_epsilon": request["epsilon"] if approved else 0.0,
        "delta": outcome.entry["delta"],
        "remaining_user_epsilon": outcome.user.remaining,
        "remaining_department_epsilon": outcome.department.remaining,
        "decided_at_ms": now_ms(),
        "request": request,
        "reserved_rho": reserved_rho if approved else 0.0,
    }


def final_result(
    outcome: Outcome, node_result: InferenceResult | None = None, *, status: str
) -> InferenceResult:
    """The terminal InferenceResult for fedllm.results."""
    entry = outcome.entry
    spent = entry.get("spent_rdp")  # the ledger's own PrivacyCurve.to_dict of a checked curve
    answered = node_result.get("reason", "") if node_result else ""
    final: InferenceResult = {
        "request_id": entry["request_id"],
        "user_id": entry["user_id"],
        "department": entry["department"],
        "status": status,
        "reason": outcome.reason if status != "ok" else answered,
        "privacy_cost": entry["spent_epsilon"],
        "delta": entry["delta"],
        "rdp_orders": list(spent["orders"]) if spent else [],
        "rdp_epsilons": list(spent["values"]) if spent else [],
        # A refusal reports the binding limit (user's or department's); otherwise the user's.
        "remaining_budget": (
            min(outcome.user.remaining, outcome.department.remaining)
            if status == "rejected"
            else outcome.user.remaining
        ),
        "finished_at_ms": now_ms(),
        "kind": results.FINAL,
    }
    base: InferenceResult = {**node_result, **final} if node_result else final
    if status != "ok":
        base["response"] = ""
        base["is_private"] = False
    base.setdefault("node_id", entry.get("node_id", ""))
    base["processing_time_ms"] = float(now_ms() - entry["created_at_ms"])
    return base


def budget_status(
    *,
    user_id: str,
    department: str,
    window_start: int,
    window_seconds: int,
    delta: float,
    user: Balance,
    dept: Balance,
) -> BudgetStatus:
    """BudgetStatus snapshot of a user's (and their department's) balances."""
    record_budget("department", department, limit=dept.limit, remaining=dept.remaining)
    return {
        "user_id": user_id,
        "department": department,
        "window_start": window_start,
        "window_seconds": window_seconds,
        "delta": delta,
        "user_limit_epsilon": user.limit,
        "user_spent_epsilon": user.spent,
        "user_remaining_epsilon": user.remaining,
        "department_limit_epsilon": dept.limit,
        "department_remaining_epsilon": dept.remaining,
        "updated_at_ms": now_ms(),
    }


def rdp_summary(curve_dict: dict[str, Any] | None, epsilon: float) -> str:
    """Compact JSON of a charged curve for the audit record."""
    if not curve_dict:
        return ""
    return json.dumps({"epsilon": round(epsilon, 6), "rdp": curve_dict}, sort_keys=True)

"""Record builders shared by the router tests."""

from __future__ import annotations

from typing import Any


def heartbeat(
    hospital_id: str,
    *,
    departments: tuple[str, ...] = ("general",),
    queue_depth: int = 0,
    in_flight: int = 0,
    latency_ms: float = 10.0,
    healthy: bool = True,
    sent_at_ms: int,
    ewma_latency_ms: float = 0.0,
    error_rate: float = 0.0,
    budget_room: int = -1,
) -> dict[str, Any]:
    return {
        "hospital_id": hospital_id,
        "departments": list(departments),
        "queue_depth": queue_depth,
        "in_flight": in_flight,
        "recent_latency_ms": latency_ms,
        "model": "smollm2",
        "device": "cpu",
        "healthy": healthy,
        "sent_at_ms": sent_at_ms,
        "ewma_latency_ms": ewma_latency_ms,
        "error_rate": error_rate,
        "budget_room": budget_room,
    }


def request(
    request_id: str,
    *,
    department: str = "general",
    hospitals: tuple[str, ...] = (),
    created_ms: int,
    deadline_ms: int,
    user_id: str = "u1",
    priority: str = "normal",
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "user_id": user_id,
        "role": "doctor",
        "department": department,
        "kind": "generate",
        "prompt": "q",
        "max_tokens": 16,
        "temperature": 0.7,
        "epsilon": 1.0,
        "delta": 1e-5,
        "require_consensus": False,
        "priority": priority,
        "hospitals": list(hospitals),
        "source_address": "",
        "created_at_ms": created_ms,
        "deadline_ms": deadline_ms,
    }


def decision(req: dict[str, Any], *, approved: bool = True, at_ms: int) -> dict[str, Any]:
    return {
        "request_id": req["request_id"],
        "approved": approved,
        "reason": "",
        "reserved_epsilon": req["epsilon"],
        "delta": req["delta"],
        "remaining_user_epsilon": 5.0,
        "remaining_department_epsilon": 5.0,
        "decided_at_ms": at_ms,
        "request": req,
    }


def node_result(
    req: dict[str, Any], *, status: str, node_id: str, attempt: int, at_ms: int
) -> dict[str, Any]:
    return {
        "request_id": req["request_id"],
        "user_id": req["user_id"],
        "department": req["department"],
        "status": status,
        "response": "answer" if status == "ok" else "",
        "node_id": node_id,
        "attempt": attempt,
        "finished_at_ms": at_ms,
    }

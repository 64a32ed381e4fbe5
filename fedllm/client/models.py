"""What `ask` returns or raises, whichever transport carried the question."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

Status = Literal["ok", "rejected", "failed", "timeout"]
Kind = Literal["generate", "aggregate"]


@dataclass(frozen=True, slots=True)
class Answer:
    """The terminal outcome of one question.

    `status` is "ok" (then `text` is the DP-released answer), "rejected" (budget refused, role
    not allowed, credential refused: `reason` says which), "failed" or "timeout" (nothing was
    released; the reservation was refunded). `epsilon_spent` is what the release really cost at
    the deployment's δ; `budget_left` is the caller's remaining ε this window (None if unknown).
    """

    request_id: str
    status: Status
    text: str = ""
    epsilon_spent: float = 0.0
    budget_left: float | None = None
    node_id: str = ""
    reason: str = ""
    is_private: bool = False
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_result(
        cls,
        result: Mapping[str, Any],
        *,
        status: Status | None = None,
        reason: str | None = None,
    ) -> Answer:
        """From a terminal result: an InferenceResult record (the Kafka reply) or the gateway's
        JSON body (HTTP, whose `status` the status code gives and whose `reason` is its
        `detail`). A missing or negative `remaining_budget` is unknown (None)."""
        left = result.get("remaining_budget")
        return cls(
            request_id=str(result.get("request_id", "")),
            status=status or cast(Status, result["status"]),  # terminal: never "partial"
            text=str(result.get("response", "")),
            epsilon_spent=float(result.get("privacy_cost", 0.0)),
            budget_left=float(left) if left is not None and left >= 0 else None,
            node_id=str(result.get("node_id", "")),
            reason=str(result.get("reason", "")) if reason is None else reason,
            is_private=bool(result.get("is_private", False)),
            tokens=int(result.get("tokens", 0)),
        )


class AskError(RuntimeError):
    """The question was not taken: invalid input, rate limit, unavailable service (HTTP status
    or 0 when the request never left this process). Nothing was spent."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}" if status_code else detail)
        self.status_code = status_code
        self.detail = detail


class AskTimeout(TimeoutError):
    """No terminal answer within the timeout. The question may still be answered later; asking
    again with the same idempotency key (Kafka) cannot spend twice."""

    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no answer to {request_id} within {timeout_s:g} s")
        self.request_id = request_id


class Client(Protocol):
    """What both transports offer."""

    def ask(
        self,
        prompt: str,
        *,
        epsilon: float,
        max_tokens: int = 32,
        kind: Kind = "generate",
        department: str | None = None,
        hospitals: tuple[str, ...] = (),
        temperature: float = 1.0,
        timeout_s: float = 180.0,
        idempotency_key: str | None = None,
    ) -> Answer: ...

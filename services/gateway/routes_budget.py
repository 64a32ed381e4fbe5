"""GET /v1/privacy/budget/{user_id}: a user's budget, from the materialised BudgetStatus."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from fedllm.schemas.records import BudgetStatus
from fedllm.services.gateway.auth import Principal
from fedllm.services.gateway.bodies import BudgetResponse, ErrorBody, PrivacyStatus
from fedllm.services.gateway.deps import CurrentPrincipal, GatewayState, State, deny

router = APIRouter(tags=["budget"])

UserId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@-]+$")]


def _current(status: BudgetStatus | None, now_s: float) -> BudgetStatus | None:
    """The snapshot if it belongs to the current window, else None (budget renewed)."""
    if status is None or status["window_start"] + status["window_seconds"] <= now_s:
        return None
    return status


def _known_department(state: GatewayState, user_id: str, principal: Principal) -> str:
    status = state.budgets.user_to_status.get(user_id)
    if status is not None:
        return status["department"]
    if user_id == principal.user_id:
        return principal.department
    user = state.gw.user(user_id)
    return user.department if user is not None else ""


def budget_of(
    *, state: GatewayState, user_id: str, department: str, now_s: float
) -> BudgetResponse:
    """The user's budget, with the design's seed fields filled from the same figures."""
    b = _budget_of(state=state, user_id=user_id, department=department, now_s=now_s)
    window = state.settings.budget.window_seconds
    return b.model_copy(
        update={
            "total_budget": b.limit,
            "consumed": b.spent,
            "daily_limit": b.limit * 86_400 / window,
            "last_refresh": b.window_start,
            "next_refresh": b.window_start + window,
        }
    )


def _budget_of(
    *, state: GatewayState, user_id: str, department: str, now_s: float
) -> BudgetResponse:
    budget = state.settings.budget
    snapshot = _current(state.budgets.user_to_status.get(user_id), now_s)
    dept_status = _current(state.budgets.department_to_status.get(department), now_s)
    if dept_status is not None:
        dept_remaining: float | None = dept_status["department_remaining_epsilon"]
    else:
        dept_remaining = budget.department_epsilon.get(department)
    if snapshot is None:
        window = budget.window_seconds
        return BudgetResponse(
            user_id=user_id,
            department=department,
            limit=budget.user_epsilon,
            spent=0.0,
            remaining=budget.user_epsilon,
            department_remaining=dept_remaining,
            window_start=int(now_s // window * window),
        )
    return BudgetResponse(
        user_id=user_id,
        department=department,
        limit=snapshot["user_limit_epsilon"],
        spent=snapshot["user_spent_epsilon"],
        remaining=snapshot["user_remaining_epsilon"],
        department_remaining=dept_remaining,
        window_start=snapshot["window_start"],
    )


@router.get(
    "/v1/privacy/budget/{user_id}",
    response_model=BudgetResponse,
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
)
async def read_budget(
    user_id: UserId, request: Request, state: State, principal: CurrentPrincipal
) -> BudgetResponse:
    department = _known_department(state, user_id, principal)
    allowed = (
        (user_id == principal.user_id and principal.can("budget.read.self"))
        or principal.can("budget.read.any")
        or (
            principal.can("budget.read.department")
            and department
            and department == principal.department
        )
    )
    if not allowed:
        raise await deny(
            state, request, principal, "may not read another user's budget", target_user=user_id
        )
    return budget_of(state=state, user_id=user_id, department=department, now_s=time.time())


@router.get(
    "/v1/privacy/status",
    response_model=PrivacyStatus,
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
)
async def privacy_status(request: Request, state: State, principal: CurrentPrincipal) -> Any:
    """The caller's own budget and the public privacy parameters it is spent under."""
    if not principal.can("budget.read.self"):
        raise await deny(state, request, principal, "may not read budgets")
    budget = state.settings.budget
    mine = budget_of(
        state=state, user_id=principal.user_id, department=principal.department, now_s=time.time()
    )
    return PrivacyStatus(
        accounting="Rényi DP per person, composed over the window; fan-out parts sum "
        "(docs/privacy.md)",
        delta=budget.delta,
        window_seconds=budget.window_seconds,
        max_query_epsilon=budget.max_query_epsilon,
        user=mine,
        department_limit=budget.department_epsilon.get(principal.department),
        department_remaining=mine.department_remaining,
    )

"""The admin API (role permission `admin`): node registry, effective configuration, budget resets.

Admins never reach patient data here: the node list comes from heartbeats (load, not records),
the configuration view carries no secret, and a budget reset is only *requested*: the gateway
validates, audits (fail closed) and publishes a BudgetAdjustment on `fedllm.admin`; the
accountant applies it to its ledger. The admin role has no `query`/`aggregate` permission by
default, so POST /v1/inference still answers 403 to it.
"""

# No `from __future__ import annotations`: FastAPI must see the dynamic body model itself.

import uuid
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Depends, HTTPException, Request

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import now_ms
from fedllm.services.gateway.auth import Principal
from fedllm.services.gateway.bodies import (
    AdminConfig,
    AuthView,
    BudgetConfigView,
    BudgetResetAccepted,
    ErrorBody,
    HospitalView,
    InfrastructureView,
    LimitsView,
    NodeInfo,
    UserView,
    budget_reset_body,
)
from fedllm.services.gateway.deps import CurrentPrincipal, GatewayState, State, client_address, deny
from fedllm.services.gateway.routes_inference import rate_limit
from fedllm.services.gateway.settings import GatewaySettings

REDACTED = "***"
_SECRET_QUERY_KEYS = ("pass", "secret", "token", "key", "credential", "auth")

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or invalid token"},
    403: {"model": ErrorBody, "description": "the role has no admin permission"},
}


async def require_admin(request: Request, state: State, principal: CurrentPrincipal) -> Principal:
    """The caller if their role has the `admin` permission; 403 + access.denied otherwise.
    A dependency, so a non-admin is refused before the body is even validated."""
    if not principal.can("admin"):
        raise await deny(
            state, request, principal, f"role {principal.role!r} may not use the admin API"
        )
    return principal


AdminPrincipal = Annotated[Principal, Depends(require_admin)]


def redact_url(url: str) -> str:
    """`url` with its password (and secret-looking query parameters) replaced by ***."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [
                (k, REDACTED if any(s in k.lower() for s in _SECRET_QUERY_KEYS) else v)
                for k, v in pairs
            ],
            safe="*/",
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def effective_config(settings: Settings, gw: GatewaySettings) -> AdminConfig:
    """The configuration this gateway runs with, without any secret value."""
    budget = settings.budget
    return AdminConfig(
        mode=settings.mode,
        departments=sorted(budget.department_epsilon),
        hospitals=[
            HospitalView(id=h.id, departments=list(h.departments), population=h.population)
            for h in settings.hospitals
        ],
        budget=BudgetConfigView(
            delta=budget.delta,
            window_seconds=budget.window_seconds,
            user_epsilon=budget.user_epsilon,
            department_epsilon=dict(budget.department_epsilon),
            max_query_epsilon=budget.max_query_epsilon,
        ),
        limits=LimitsView(
            max_prompt_chars=settings.max_prompt_chars,
            max_tokens_limit=settings.max_tokens_limit,
            request_timeout_s=settings.request_timeout_s,
            node_timeout_s=settings.node_timeout_s,
            node_ttl_s=settings.node_ttl_s,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            dp_groups=settings.dp_groups,
            rate_window_s=gw.rate_window_s,
            rate_limit_user=gw.rate_limit_user,
            rate_limit_address=gw.rate_limit_address,
            lockout_window_s=gw.lockout_window_s,
            lockout_user_failures=gw.lockout_user_failures,
            lockout_address_failures=gw.lockout_address_failures,
        ),
        auth=AuthView(
            jwt_algorithm=settings.jwt_algorithm,
            jwt_audience=settings.jwt_audience,
            jwt_kid=gw.jwt_kid,
            jwt_previous_kids=sorted(gw.jwt_previous_keys),
            jwt_leeway_s=gw.jwt_leeway_s,
            token_ttl_s=gw.token_ttl_s,
            roles={r: list(p) for r, p in gw.roles.items()},
            users=[
                UserView(
                    username=u.username, department=u.department, role=u.role, disabled=u.disabled
                )
                for u in gw.users
            ],
        ),
        infrastructure=InfrastructureView(
            kafka_bootstrap=redact_url(settings.kafka_bootstrap),
            kafka_security_protocol=settings.kafka_security_protocol,
            database_url=redact_url(settings.resolved_database_url()),
            redis_url=redact_url(settings.redis_url),
            tls=bool(gw.tls_certfile),
            mtls_required=gw.mtls_required,
            forwarded_allow_ips=gw.forwarded_allow_ips,
        ),
    )


async def request_budget_reset(
    *,
    state: GatewayState,
    request: Request,
    principal: Principal,
    scope: str,
    subject: str,
    reason: str,
) -> str:
    """Audit (fail closed), then publish one BudgetAdjustment; returns its id."""
    address = client_address(request)
    await rate_limit(state=state, user_id=principal.user_id, address=address)
    if state.bus is None:
        raise HTTPException(503, "broker unavailable")
    adjustment_id = str(uuid.uuid4())
    record = {
        "adjustment_id": adjustment_id,
        "action": "reset",
        "scope": scope,
        "subject": subject,
        "reason": reason,
        "actor_user_id": principal.user_id,
        "actor_role": principal.role,
        "source_address": address,
        "requested_at_ms": now_ms(),
    }
    try:
        await state.audit(
            action="admin.budget_reset_requested",
            id_parts=(adjustment_id,),
            required=True,
            request_id=adjustment_id,
            user_id=principal.user_id,
            role=principal.role,
            department=principal.department,
            source_address=address,
            outcome="accepted",
            reason=reason,
            scope=scope,
            subject=subject,
            adjustment_id=adjustment_id,
        )
        await state.bus.send(topics.ADMIN, "BudgetAdjustment", record, key=subject)
    except Exception:
        raise HTTPException(503, "broker unavailable") from None
    return adjustment_id


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["admin"])
    reset_body = budget_reset_body(settings)

    @router.get("/v1/admin/nodes", response_model=list[NodeInfo], responses=AUTH_RESPONSES)
    async def list_nodes(state: State, principal: AdminPrincipal) -> list[NodeInfo]:
        """Hospital nodes this gateway has heard from (their latest heartbeat each)."""
        fields = NodeInfo.model_fields
        return [
            NodeInfo(**{k: v for k, v in node.items() if k in fields})
            for node in state.nodes.snapshot(now_ms())
        ]

    @router.get("/v1/admin/config", response_model=AdminConfig, responses=AUTH_RESPONSES)
    async def read_config(request: Request, state: State, principal: AdminPrincipal) -> AdminConfig:
        """The effective non-secret configuration: budgets, departments, hospitals, limits."""
        await state.audit(
            action="admin.config_read",
            user_id=principal.user_id,
            role=principal.role,
            department=principal.department,
            source_address=client_address(request),
            outcome="allowed",
        )
        return effective_config(state.settings, state.gw)

    @router.post(
        "/v1/admin/budget/reset",
        status_code=202,
        response_model=BudgetResetAccepted,
        responses={
            **AUTH_RESPONSES,
            400: {"model": ErrorBody, "description": "body is not parseable"},
            422: {"description": "invalid body (unknown department, bad user id, no reason)"},
            429: {"model": ErrorBody, "description": "rate limited (see Retry-After)"},
            503: {"model": ErrorBody, "description": "broker or rate-limit store unavailable"},
        },
    )
    async def reset_budget(
        request: Request,
        state: State,
        principal: AdminPrincipal,
        body: reset_body,  # type: ignore[valid-type]
    ) -> BudgetResetAccepted:
        """Request a reset of a user's or a department's budget in the current window. The
        accountant applies it; the request is audited before it is published."""
        adjustment_id = await request_budget_reset(
            state=state,
            request=request,
            principal=principal,
            scope=body.scope,
            subject=body.subject,
            reason=body.reason,
        )
        return BudgetResetAccepted(adjustment_id=adjustment_id)

    return router

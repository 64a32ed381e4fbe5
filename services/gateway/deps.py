"""Shared state of one gateway app and its FastAPI dependencies (`Annotated` aliases)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from aiokafka import AIOKafkaProducer
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedllm.common import audit
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus
from fedllm.services.gateway.answer_cache import AnswerCache
from fedllm.services.gateway.auth import AuthError, PasswordChecker, Principal, TokenVerifier
from fedllm.services.gateway.correlator import BudgetView, NodeView, ResultCorrelator
from fedllm.services.gateway.metrics import GatewayMetrics
from fedllm.services.gateway.ratelimit import RateLimiter
from fedllm.services.gateway.results import ResultArchiver, ResultStore
from fedllm.services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

SERVICE = "gateway"


@dataclass
class GatewayState:
    settings: Settings
    gw: GatewaySettings
    verifier: TokenVerifier
    passwords: PasswordChecker
    limiter: RateLimiter
    metrics: GatewayMetrics
    correlator: ResultCorrelator
    budgets: BudgetView
    nodes: NodeView
    request_timeout_s: float
    hmac_key: bytes
    results: ResultStore
    archiver: ResultArchiver
    producer: AIOKafkaProducer | None = None
    bus: Bus | None = None
    cache: AnswerCache | None = None  # the answer cache; None without Redis or when disabled
    extra: dict[str, Any] = field(default_factory=dict)

    async def audit(
        self,
        *,
        action: str,
        id_parts: tuple[object, ...] = (),
        required: bool = False,
        **fields: Any,
    ) -> None:
        """Emit one AuditEvent. `required` events propagate failures (fail closed)."""
        if self.bus is None:
            if required:
                raise RuntimeError("audit bus not started")
            return
        try:
            await audit.emit(
                self.bus,
                action=action,
                service=SERVICE,
                id_parts=id_parts or (uuid.uuid4().hex,),
                **fields,
            )
        except Exception as exc:
            if required:
                raise
            log.warning("audit %s not written: %r", action, exc)


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


State = Annotated[GatewayState, Depends(get_state)]

_bearer = HTTPBearer(auto_error=False, description="JWT from POST /v1/auth/token")


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


async def get_principal(
    request: Request,
    state: State,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller from the bearer token; 401 with the reason otherwise (audited)."""
    if credentials is None or not credentials.credentials:
        reason = "missing bearer token"
    else:
        try:
            return state.verifier.verify(credentials.credentials)
        except AuthError as exc:
            reason = exc.reason
    state.metrics.denied.labels("auth").inc()
    await state.audit(
        action="auth.failed",
        outcome="denied",
        reason=reason,
        source_address=client_address(request),
        path=request.url.path,
    )
    raise HTTPException(
        status_code=401,
        detail=reason,
        headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'},
    )


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


async def deny(
    state: GatewayState, request: Request, principal: Principal, reason: str, **fields: Any
) -> HTTPException:
    """Audit an RBAC refusal and build the 403 to raise."""
    state.metrics.denied.labels("rbac").inc()
    await state.audit(
        action="access.denied",
        outcome="denied",
        reason=reason,
        user_id=principal.user_id,
        role=principal.role,
        department=principal.department,
        source_address=client_address(request),
        path=request.url.path,
        **fields,
    )
    return HTTPException(status_code=403, detail=reason)

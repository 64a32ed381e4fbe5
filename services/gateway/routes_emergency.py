"""Emergency controls (admin only, audited, published on `fedllm.control`):

- security lockdown: only admins are served; everyone else gets 503 with the reason;
- halt processing: the gateway refuses new inference (503), the router fails approved
  decisions and the nodes fail queued work before any mechanism starts, so the accountant
  refunds every reservation (nothing was released);
- circuit breakers: a node's breaker opened by hand keeps the router from sending it work until
  closed by hand (the router also opens breakers on its own, on error rate or latency).
"""

# No `from __future__ import annotations`: FastAPI must see the body models.

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from fedllm.services.gateway import control_plane
from fedllm.services.gateway.auth import Principal
from fedllm.services.gateway.bodies import ErrorBody
from fedllm.services.gateway.deps import GatewayState, State
from fedllm.services.gateway.routes_admin import AUTH_RESPONSES, AdminPrincipal

HOSPITAL_ID = r"^[A-Za-z0-9_.-]{1,64}$"


class Switch(BaseModel):
    """Turn an emergency state on (with the reason shown to callers) or off."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool
    reason: str = Field(min_length=3, max_length=500)


class Breaker(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    open: bool
    reason: str = Field(min_length=3, max_length=500)


class EmergencyView(BaseModel):
    lockdown: bool
    lockdown_reason: str
    halted: bool
    halted_reason: str
    open_breakers: dict[str, str]


RESPONSES = {
    **AUTH_RESPONSES,
    400: {"model": ErrorBody, "description": "body is not parseable"},
    503: {"model": ErrorBody, "description": "broker unavailable"},
}


def _view(state: GatewayState) -> EmergencyView:
    return EmergencyView(**control_plane.control_state(state).view())


async def _command(
    state: GatewayState,
    request: Request,
    principal: Principal,
    *,
    action: str,
    reason: str,
    target: str = "",
) -> EmergencyView:
    """Issue one control command (audited, published, applied) and show the state after it."""
    await control_plane.issue(
        state, request, principal, action=action, target=target, reason=reason
    )
    return _view(state)


def build_router() -> APIRouter:
    router = APIRouter(tags=["admin"])

    @router.get("/v1/admin/emergency", response_model=EmergencyView, responses=AUTH_RESPONSES)
    async def emergency_state(state: State, principal: AdminPrincipal) -> EmergencyView:
        """Lockdown, halt and manually opened breakers as this gateway knows them."""
        return _view(state)

    @router.post("/v1/admin/emergency/lockdown", response_model=EmergencyView, responses=RESPONSES)
    async def lockdown(
        request: Request, state: State, principal: AdminPrincipal, body: Switch
    ) -> EmergencyView:
        """Security lockdown on or off: while on, only admins are served."""
        action = "lockdown" if body.enabled else "unlock"
        return await _command(state, request, principal, action=action, reason=body.reason)

    @router.post("/v1/admin/emergency/halt", response_model=EmergencyView, responses=RESPONSES)
    async def halt(
        request: Request, state: State, principal: AdminPrincipal, body: Switch
    ) -> EmergencyView:
        """Halt all processing (queued work ends failed and refunded) or resume it."""
        action = "halt" if body.enabled else "resume"
        return await _command(state, request, principal, action=action, reason=body.reason)

    @router.post(
        "/v1/admin/nodes/{hospital_id}/breaker", response_model=EmergencyView, responses=RESPONSES
    )
    async def breaker(
        request: Request,
        state: State,
        principal: AdminPrincipal,
        body: Breaker,
        hospital_id: str = Path(pattern=HOSPITAL_ID),
    ) -> EmergencyView:
        """Open (no work is routed to the node) or close a node's circuit breaker by hand."""
        action = "breaker_open" if body.open else "breaker_close"
        return await _command(
            state, request, principal, action=action, target=hospital_id, reason=body.reason
        )

    return router

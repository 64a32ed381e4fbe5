"""The gateway's side of the control plane: follows `fedllm.control`, issues commands, and
enforces security lockdown and halted processing on HTTP requests.

Every command is authorised (admin routes), audited fail-closed, published on `fedllm.control`
and folded into this gateway's `ControlState` at once (other replicas fold it on reading).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from fedllm.common import control
from fedllm.common.kafka import now_ms
from fedllm.schemas.records import ControlCommand
from fedllm.services.gateway.auth import AuthError, Principal
from fedllm.services.gateway.deps import GatewayState, client_address

EXTRA_KEY = "control"

# Served during a lockdown to anyone: liveness, login (admins need tokens), docs, console shell.
LOCKDOWN_OPEN = (
    "/v1/health",
    "/v1/ready",
    "/metrics",
    "/v1/auth/",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/static-offline-docs",
    "/ui",
)


def follower(state: GatewayState) -> control.ControlFollower:
    """This gateway's follower (created on first use; started by the app's lifespan)."""
    found = state.extra.get(EXTRA_KEY)
    if found is None:
        found = control.ControlFollower(
            state.settings, on_command=lambda record: on_command(state, record)
        )
        state.extra[EXTRA_KEY] = found
    return found


def control_state(state: GatewayState) -> control.ControlState:
    return follower(state).state


def on_command(state: GatewayState, record: ControlCommand) -> None:
    """Apply what the gateway itself uses: the answer cache switch."""
    if record["action"] == "config_set" and record["target"] == "cache_enabled":
        enabled = control_state(state).setting("cache_enabled")
        if "cache_saved" not in state.extra:
            state.extra["cache_saved"] = state.cache
        state.cache = state.extra["cache_saved"] if enabled else None


async def start(state: GatewayState) -> None:
    await follower(state).start()


async def stop(state: GatewayState) -> None:
    await follower(state).stop()
    if "cache_saved" in state.extra:  # closed by the app whether enabled or not
        state.cache = state.extra.pop("cache_saved")


async def issue(
    state: GatewayState,
    request: Request,
    principal: Principal,
    *,
    action: str,
    target: str = "",
    value: Any = None,
    reason: str,
    **audit_fields: str,
) -> ControlCommand:
    """Audit (fail closed), publish and apply one ControlCommand; 503 if the broker is down."""
    if state.bus is None:
        raise HTTPException(503, "broker unavailable")
    record: ControlCommand = {
        "command_id": str(uuid.uuid4()),
        "action": action,
        "target": target,
        "value": "" if value is None else json.dumps(value),
        "reason": reason,
        "actor_user_id": principal.user_id,
        "actor_role": principal.role,
        "issued_at_ms": now_ms(),
    }
    try:
        await state.audit(
            action=f"admin.control.{action}",
            id_parts=(record["command_id"],),
            required=True,
            request_id=record["command_id"],
            user_id=principal.user_id,
            role=principal.role,
            department=principal.department,
            source_address=client_address(request),
            outcome="accepted",
            reason=reason,
            target=target,
            **audit_fields,
        )
        await control.publish(state.bus, record)
    except Exception:
        raise HTTPException(503, "broker unavailable") from None
    follower(state).apply(record)
    return record


def _caller(state: GatewayState, request: Request) -> Principal | None:
    """The bearer token's principal, or None (the route's own check then answers 401)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return state.verifier.verify(token.strip())
    except AuthError:
        return None


def install(app: FastAPI, state: GatewayState) -> None:
    """The lockdown / halt middleware (runs before routing and authentication). During a
    lockdown a caller with a valid non-admin token gets 503 with the reason."""
    app.add_middleware(EmergencyGate, state=state)


class EmergencyGate:
    """Plain ASGI middleware answering 503 during a lockdown or a halt (see :func:`install`)."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(Request(scope)) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> JSONResponse | None:
        state = self.state
        ctl = state.extra.get(EXTRA_KEY)
        current = ctl.state if ctl is not None else None
        if current is None:
            return None
        path = request.url.path
        if current.lockdown is not None:
            caller = None if path.startswith(LOCKDOWN_OPEN) else _caller(state, request)
            # Authenticated non-admins get the reason; without a valid token the route
            # answers 401 as always (and serves nothing).
            if caller is not None and not caller.can("admin"):
                state.metrics.denied.labels("lockdown").inc()
                return JSONResponse(
                    status_code=503,
                    content={"detail": f"security lockdown: {current.lockdown}"},
                    headers={"Retry-After": "60"},
                )
        if (
            current.halted is not None
            and request.method == "POST"
            and path.rstrip("/") == "/v1/inference"
        ):
            return JSONResponse(
                status_code=503,
                content={"detail": f"processing halted: {current.halted}"},
                headers={"Retry-After": "60"},
            )
        return None

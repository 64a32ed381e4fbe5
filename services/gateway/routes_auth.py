"""POST /v1/auth/token: username + password -> short-lived JWT, with brute-force lockout."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, HTTPException, Request

from fedllm.services.gateway.bodies import ErrorBody, TokenRequest, TokenResponse
from fedllm.services.gateway.deps import State, client_address
from fedllm.services.gateway.ratelimit import Window
from fedllm.services.gateway.tokens import mint_token

router = APIRouter(tags=["auth"])


@router.post(
    "/v1/auth/token",
    response_model=TokenResponse,
    responses={
        400: {"model": ErrorBody, "description": "body is not parseable"},
        401: {"model": ErrorBody, "description": "invalid credentials"},
        423: {"model": ErrorBody, "description": "account locked after repeated failures"},
        429: {"model": ErrorBody, "description": "too many failures from this address"},
        503: {"model": ErrorBody, "description": "lockout store unavailable"},
    },
)
async def issue_token(body: TokenRequest, request: Request, state: State) -> TokenResponse:
    gw = state.gw
    address = client_address(request)
    user_window = Window(
        f"{gw.redis_prefix}:lock:user:{body.username}",
        gw.lockout_user_failures,
        gw.lockout_window_s,
    )
    addr_window = Window(
        f"{gw.redis_prefix}:lock:addr:{address}", gw.lockout_address_failures, gw.lockout_window_s
    )
    try:
        user_failures, user_wait = await state.limiter.count(user_window)
        addr_failures, addr_wait = await state.limiter.count(addr_window)
    except Exception:
        raise HTTPException(503, "lockout store unavailable") from None
    if user_failures >= user_window.limit:
        state.metrics.denied.labels("lockout").inc()
        await state.audit(
            action="auth.locked",
            outcome="denied",
            user_id=body.username,
            source_address=address,
            reason="account locked",
        )
        raise HTTPException(
            423, "account temporarily locked", headers={"Retry-After": str(user_wait)}
        )
    if addr_failures >= addr_window.limit:
        state.metrics.denied.labels("lockout").inc()
        await state.audit(
            action="auth.locked",
            outcome="denied",
            user_id=body.username,
            source_address=address,
            reason="address locked",
        )
        raise HTTPException(
            429, "too many failed logins from this address", headers={"Retry-After": str(addr_wait)}
        )

    user = gw.user(body.username)
    usable = user is not None and not user.disabled
    ok = await asyncio.to_thread(
        state.passwords.verify, user.password_hash if usable and user else None, body.password
    )
    if not ok or user is None:
        try:
            n_user = await state.limiter.add(user_window)
            n_addr = await state.limiter.add(addr_window)
        except Exception:
            raise HTTPException(503, "lockout store unavailable") from None
        state.metrics.denied.labels("auth").inc()
        await state.audit(
            action="auth.failed",
            outcome="denied",
            user_id=body.username,
            source_address=address,
            reason="invalid credentials",
            path=request.url.path,
        )
        for n, limit, scope in (
            (n_user, user_window.limit, "user"),
            (n_addr, addr_window.limit, "address"),
        ):
            if n == limit:
                await state.audit(
                    action="auth.lockout",
                    outcome="locked",
                    user_id=body.username,
                    source_address=address,
                    reason=f"{scope} locked after {n} failed logins",
                    scope=scope,
                    severity="security",
                )
        raise HTTPException(401, "invalid credentials", headers={"WWW-Authenticate": "Bearer"})

    try:
        await state.limiter.clear(user_window.key)
    except Exception:
        raise HTTPException(503, "lockout store unavailable") from None
    token = mint_token(
        state.settings,
        user_id=user.username,
        department=user.department,
        role=user.role,
        ttl_s=gw.token_ttl_s,
        kid=gw.jwt_kid,
        regions=user.regions,
    )
    await state.audit(
        action="auth.token_issued",
        outcome="ok",
        user_id=user.username,
        role=user.role,
        department=user.department,
        source_address=address,
    )
    return TokenResponse(access_token=token, expires_in=gw.token_ttl_s)

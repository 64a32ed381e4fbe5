"""POST /v1/inference: authorise, rate-limit, publish an InferenceRequest, await its result."""

# No `from __future__ import annotations`: FastAPI must see the dynamic body model itself.

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from fedllm.common import logs, topics
from fedllm.common.aggregate_query import parse_query
from fedllm.common.audit import prompt_hmac
from fedllm.common.identity import CREDENTIAL_HEADER, identifying_terms
from fedllm.common.kafka import now_ms
from fedllm.common.residency import RegionPolicy
from fedllm.schemas.records import InferenceRequest, InferenceResult
from fedllm.services.gateway.bodies import (
    BudgetRefused,
    ErrorBody,
    InferenceBodyBase,
    InferenceResponse,
    Pending,
    TimedOut,
)
from fedllm.services.gateway.cached_answers import request_key, serve_hit
from fedllm.services.gateway.deps import CurrentPrincipal, GatewayState, State, client_address, deny
from fedllm.services.gateway.errors import printable
from fedllm.services.gateway.ratelimit import Window

log = logging.getLogger(__name__)

RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "body is not parseable"},
    401: {"model": ErrorBody, "description": "missing or invalid token"},
    403: {"model": BudgetRefused, "description": "role not allowed, or privacy budget refused"},
    422: {"description": "invalid body, or an aggregate query the nodes' grammar refuses"},
    409: {"model": ErrorBody, "description": "consensus unavailable: too few eligible hospitals"},
    429: {"model": ErrorBody, "description": "rate limited (see Retry-After)"},
    502: {"model": ErrorBody, "description": "the pipeline failed the request"},
    503: {"model": ErrorBody, "description": "broker or rate-limit store unavailable"},
    504: {"model": TimedOut, "description": "no result before the deadline"},
}


async def authorise(
    *, state: GatewayState, request: Request, principal: Any, body: InferenceBodyBase
) -> str:
    """RBAC and department checks; returns the department the query runs for."""
    needed = "query" if body.kind == "generate" else "aggregate"
    if not principal.can(needed):
        raise await deny(
            state, request, principal, f"role {principal.role!r} may not run {body.kind} queries"
        )
    department = body.department or principal.department
    if department not in state.settings.budget.department_epsilon:
        raise HTTPException(422, f"department {department!r} is not configured")
    if department != principal.department:
        raise await deny(
            state,
            request,
            principal,
            "queries may only be made for the caller's own department",
            requested_department=department,
        )
    residency = RegionPolicy.from_settings(state.settings)
    scope = {"department": department, "allowed_regions": list(principal.regions)}
    outside = residency.outside(scope, body.hospitals)
    if outside:
        raise await deny(
            state,
            request,
            principal,
            f"data residency: {', '.join(outside)} outside the {residency.describe(scope)} "
            "this user may use",
        )
    if body.require_consensus:
        _check_consensus(state, body, scope, residency)
    if body.use_adapter and (body.kind != "generate" or body.require_consensus):
        raise HTTPException(
            422, "use_adapter answers single generate questions only (docs/federated.md)"
        )
    if body.kind == "aggregate":
        try:
            query = json.loads(body.prompt)
        except (ValueError, RecursionError):
            raise HTTPException(422, "invalid aggregate query: not valid JSON") from None
        if not isinstance(query, dict):
            raise HTTPException(422, "invalid aggregate query: must be a JSON object")
        if principal.can("deidentified_only"):
            banned = {f.lower() for f in state.gw.identifying_fields}
            named = identifying_terms(query, banned)
            if named:
                raise await deny(
                    state,
                    request,
                    principal,
                    "role may only use de-identified fields; query names "
                    + ", ".join(sorted(named)),
                )
        try:  # the node's own grammar: a bad query is refused here, before any charge
            parse_query(query)
        except (ValueError, RecursionError) as exc:
            detail = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
            raise HTTPException(422, f"invalid aggregate query: {printable(detail)}") from None
    return department


def _check_consensus(
    state: GatewayState, body: InferenceBodyBase, scope: dict[str, Any], residency: RegionPolicy
) -> None:
    """422 when consensus cannot be had: a text query, or fewer than k configured hospitals
    serving the department in the caller's regions (the router re-checks the live ones)."""
    k = state.settings.consensus_k
    if body.kind != "aggregate":
        raise HTTPException(
            422,
            "require_consensus is available for aggregate queries only: free-text answers "
            "cannot be combined privately across hospitals yet (docs/consensus.md)",
        )
    named = {h for h in body.hospitals if h != "*"}
    eligible = [
        h.id
        for h in state.settings.hospitals
        if scope["department"] in h.departments
        and residency.permits(scope, h.id)
        and (not named or h.id in named)
    ]
    if len(eligible) < k:
        raise HTTPException(
            422,
            f"consensus needs {k} hospitals serving {scope['department']} "
            f"({residency.describe(scope)}); {len(eligible)} configured",
        )


async def rate_limit(*, state: GatewayState, user_id: str, address: str) -> None:
    gw = state.gw
    windows = [
        Window(f"{gw.redis_prefix}:rl:user:{user_id}", gw.rate_limit_user, gw.rate_window_s),
        Window(f"{gw.redis_prefix}:rl:addr:{address}", gw.rate_limit_address, gw.rate_window_s),
    ]
    try:
        verdict = await state.limiter.hit(windows)
    except Exception:
        raise HTTPException(503, "rate-limit store unavailable") from None
    if not verdict.allowed:
        scope = "user" if verdict.blocked_key == windows[0].key else "address"
        state.metrics.denied.labels("rate_limit").inc()
        await state.audit(
            action="rate.limited",
            outcome="denied",
            user_id=user_id,
            source_address=address,
            reason=f"{scope} rate limit exceeded",
        )
        raise HTTPException(
            429, f"{scope} rate limit exceeded", headers={"Retry-After": str(verdict.retry_after_s)}
        )


def build_router(body_model: type[InferenceBodyBase]) -> APIRouter:
    router = APIRouter(tags=["inference"])

    @router.post("/v1/inference", response_model=InferenceResponse, responses=RESPONSES)
    async def create_inference(
        request: Request,
        state: State,
        principal: CurrentPrincipal,
        body: body_model,  # type: ignore[valid-type]
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=200,
                description="same key and caller → the same request, charged once; its result "
                "is returned again (or awaited) instead of running a new request",
            ),
        ] = None,
    ) -> Any:
        started = time.monotonic()
        address = client_address(request)
        department = await authorise(state=state, request=request, principal=principal, body=body)
        await rate_limit(state=state, user_id=principal.user_id, address=address)
        # No answer cache for consensus (its fields are per release) or for a user with their
        # own regions (a cached release may come from a hospital outside them).
        cache_key = (
            None
            if body.require_consensus or principal.regions or body.use_adapter
            else request_key(state, body, department)
        )  # None: no answer cache
        if cache_key is not None and state.cache is not None:
            hit = await state.cache.lookup(cache_key, wait_s=state.request_timeout_s / 2)
            if hit is not None:
                return await serve_hit(
                    state=state,
                    cache=state.cache,
                    principal=principal,
                    department=department,
                    address=address,
                    body=body,
                    hit=hit,
                    started=started,
                )

        settings = state.settings
        request_id = str(uuid.uuid4())
        logs.request_id_var.set(request_id)  # until the request ends (app.ObserveRequests)
        created = now_ms()
        record: InferenceRequest = {
            "request_id": request_id,
            "user_id": principal.user_id,
            "role": principal.role,
            "department": department,
            "kind": body.kind,
            "prompt": body.prompt,
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "epsilon": body.privacy_budget,
            "delta": settings.budget.delta,
            "require_consensus": body.require_consensus,
            "use_adapter": body.use_adapter,
            "priority": body.priority,
            "hospitals": list(body.hospitals),
            "allowed_regions": list(principal.regions),
            "source_address": address,
            "created_at_ms": created,
            "deadline_ms": created + int(settings.request_timeout_s * 1000),
        }
        result: InferenceResult | None = None
        if state.bus is None:
            raise HTTPException(503, "broker unavailable")
        try:
            if idempotency_key is not None:
                bound = await state.results.claim(
                    user_id=principal.user_id, key=idempotency_key, request_id=request_id
                )
                if bound != request_id:  # a retry: the same request, never a second charge
                    return await _collect(state, bound, started)
            await state.results.set_owner(request_id, principal.user_id)
        except Exception:
            raise HTTPException(503, "result store unavailable") from None
        future = state.correlator.register(request_id)  # before producing: no lost results
        state.metrics.in_flight.inc()
        try:
            try:
                # The caller's own bearer token travels with the event: the accountant
                # verifies it again before it reserves anything.
                credential = request.headers.get("authorization", "").encode()
                await state.bus.send(
                    topics.REQUESTS,
                    "InferenceRequest",
                    record,
                    key=principal.user_id,
                    headers=[(CREDENTIAL_HEADER, credential)],
                )
            except Exception:
                if idempotency_key is not None:  # nothing was sent: the key may be reused
                    await state.results.release(user_id=principal.user_id, key=idempotency_key)
                raise HTTPException(503, "broker unavailable") from None
            # Audited only once the request is on its way, so every received request reaches
            # a terminal audit record (the accountant's).
            await state.audit(
                action="request.received",
                id_parts=(request_id,),
                request_id=request_id,
                user_id=principal.user_id,
                role=principal.role,
                department=department,
                source_address=address,
                outcome="accepted",
                epsilon=body.privacy_budget,
                delta=settings.budget.delta,
                prompt_hmac=prompt_hmac(state.hmac_key, body.prompt),
                kind=body.kind,
            )
            result = await _await_result(state, request_id, future, started)
        finally:
            state.correlator.discard(request_id)
            state.metrics.in_flight.dec()
            if cache_key is not None and state.cache is not None:  # store an ok release
                await state.cache.settle(
                    cache_key,
                    result if isinstance(result, dict) else None,
                    epsilon=body.privacy_budget,
                )
        if isinstance(result, JSONResponse):
            return result
        with contextlib.suppress(Exception):  # the archiver stores it too
            await state.results.put(result)
        return _respond(state, request_id, result, started)

    @router.get(
        "/v1/inference/{request_id}",
        response_model=InferenceResponse,
        responses={
            **RESPONSES,
            202: {"model": Pending, "description": "accepted, not finished yet"},
            404: {"model": ErrorBody, "description": "no such request of yours"},
        },
    )
    async def get_inference(request_id: str, state: State, principal: CurrentPrincipal) -> Any:
        """The terminal result of one of the caller's requests (kept `result_retention_s`)."""
        try:
            record = await state.results.get(request_id) or state.correlator.recent(request_id)
            owner = await state.results.owner(request_id)
        except Exception:
            raise HTTPException(503, "result store unavailable") from None
        if record is not None and record["user_id"] == principal.user_id:
            return _respond(state, request_id, record, time.monotonic())
        if owner == principal.user_id:
            return JSONResponse(
                status_code=202, content={"request_id": request_id, "status": "pending"}
            )
        raise HTTPException(404, "no such request")

    return router


async def _await_result(state: GatewayState, request_id: str, future: Any, started: float) -> Any:
    """The terminal result, or a 504 carrying the request id (collect it later by GET)."""
    remaining = state.request_timeout_s - (time.monotonic() - started)
    try:
        return await asyncio.wait_for(future, timeout=max(0.0, remaining))
    except TimeoutError:
        state.metrics.inference.labels("gateway_timeout").inc()
        return JSONResponse(
            status_code=504,
            content={
                "detail": "no result before the gateway deadline; collect it with "
                f"GET /v1/inference/{request_id}",
                "request_id": request_id,
            },
        )


async def _collect(state: GatewayState, request_id: str, started: float) -> Any:
    """The response for an existing request: its stored result, or wait for it."""
    stored = await state.results.get(request_id)
    if stored is not None:
        return _respond(state, request_id, stored, started)
    future = state.correlator.register(request_id)
    try:
        stored = await state.results.get(request_id)  # archived while we registered
        result = (
            stored
            if stored is not None
            else await _await_result(state, request_id, future, started)
        )
    finally:
        state.correlator.discard(request_id)
    if isinstance(result, JSONResponse):
        return result
    return _respond(state, request_id, result, started)


def _respond(state: GatewayState, request_id: str, result: InferenceResult, started: float) -> Any:
    status = result["status"]
    state.metrics.inference.labels(
        status if status in {"ok", "rejected", "failed", "timeout"} else "unknown"
    ).inc()
    log.info("inference finished: %s after %.0f ms", status, (time.monotonic() - started) * 1000)
    remaining = result["remaining_budget"]
    if status == "ok":
        processing = result["processing_time_ms"] / 1000 or (time.monotonic() - started)
        return InferenceResponse(
            request_id=request_id,
            response=result["response"],
            privacy_cost=result["privacy_cost"],
            remaining_budget=remaining,
            node_id=result["node_id"],
            processing_time=processing,
            model_time=result["model_time_ms"],
            is_private=result["is_private"],
            tokens=result["tokens"],
            consensus_reached=bool(result.get("consensus_reached") or False),
            confidence_score=result.get("confidence_score"),
            adapter_hash=str(result.get("adapter_hash") or ""),
            adapter_epsilon=float(result.get("adapter_epsilon") or 0.0),
        )
    if status == "rejected":
        return JSONResponse(
            status_code=403,
            content={
                "detail": result["reason"] or "privacy budget refused",
                "remaining_budget": remaining if remaining >= 0 else None,
            },
        )
    if status == "timeout":
        return JSONResponse(
            status_code=504,
            content={
                "detail": result["reason"] or "the request timed out",
                "request_id": request_id,
            },
        )
    reason = result["reason"] or f"request {status}"
    if reason.startswith("consensus unavailable"):  # too few eligible hospitals: nothing ran
        return JSONResponse(status_code=409, content={"detail": reason})
    return JSONResponse(status_code=502, content={"detail": reason})

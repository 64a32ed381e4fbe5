"""The gateway's FastAPI app factory: HTTP in, Kafka out, results correlated back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedllm.common import logs, topics, tracing
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, ensure_topics, make_producer, wait_for_broker
from fedllm.services.gateway import (
    allow_header,
    control_plane,
    routes_admin,
    routes_auth,
    routes_budget,
    routes_console,
    routes_emergency,
    routes_inference,
    routes_nodes_config,
)
from fedllm.services.gateway.auth import PasswordChecker
from fedllm.services.gateway.bodies import Health, Readiness, inference_body_model
from fedllm.services.gateway.cached_answers import make_answer_cache
from fedllm.services.gateway.correlator import BudgetView, NodeView, ResultCorrelator
from fedllm.services.gateway.deps import GatewayState, State
from fedllm.services.gateway.errors import invalid_request
from fedllm.services.gateway.metrics import GatewayMetrics
from fedllm.services.gateway.ratelimit import RateLimiter, make_limiter
from fedllm.services.gateway.results import ResultArchiver, make_result_store
from fedllm.services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

GATEWAY_TOPICS = (
    topics.REQUESTS,
    topics.RESULTS,
    topics.BUDGETS,
    topics.AUDIT,
    topics.HEARTBEATS,
    topics.ADMIN,
    topics.CONTROL,
)


async def is_ready(state: GatewayState) -> Readiness:
    broker = False
    if state.producer is not None:
        try:
            broker = bool(
                await asyncio.wait_for(state.producer.client.force_metadata_update(), timeout=2.0)
            )
        except Exception:
            broker = False
    try:
        limiter = await asyncio.wait_for(state.limiter.ping(), timeout=2.0)
    except Exception:
        limiter = False
    results = state.correlator.assigned.is_set() and state.correlator.running
    budgets = state.budgets.assigned.is_set() and state.budgets.running
    return Readiness(
        ready=broker and results and budgets and limiter,
        broker=broker,
        results_assigned=results,
        budgets_assigned=budgets,
        limiter=limiter,
    )


def quiet_kafka_client_logs() -> None:
    """aiokafka logs whole message values at DEBUG (prompts, answers): never below INFO here."""
    kafka_log = logging.getLogger("aiokafka")
    if kafka_log.getEffectiveLevel() < logging.INFO:
        kafka_log.setLevel(logging.INFO)


class ObserveRequests:
    """Counts and times every HTTP request by route and status, in a server span (the root of
    the request's trace, or a child of its traceparent). Plain ASGI: Starlette's
    ``@app.middleware`` costs a task and a memory stream per request."""

    def __init__(self, app: ASGIApp, state: GatewayState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # A route may bind the request id for its log lines: it ends with the request.
        token = logs.request_id_var.set("")
        try:
            with tracing.server_span(f"gateway {scope['method']}", Headers(scope=scope)):
                await self.app(scope, receive, sending)
        finally:
            logs.request_id_var.reset(token)
            name = getattr(scope.get("route"), "path", "unmatched")
            self.state.metrics.requests.labels(name, str(status)).inc()
            self.state.metrics.latency.labels(name).observe(time.perf_counter() - started)


def create_app(
    settings: Settings,
    *,
    gateway_settings: GatewaySettings | None = None,
    request_timeout_s: float | None = None,
    limiter: RateLimiter | None = None,
    assignment_wait_s: float = 15.0,
) -> FastAPI:
    """Build the gateway. Refuses (ValueError) a placeholder JWT secret outside demo mode."""
    gw = gateway_settings if gateway_settings is not None else GatewaySettings()
    quiet_kafka_client_logs()
    verifier = gw.verifier(settings)
    own_limiter = limiter is None
    results = make_result_store(
        settings.redis_url, retention_s=gw.result_retention_s, prefix=gw.redis_prefix
    )
    state = GatewayState(
        settings=settings,
        gw=gw,
        verifier=verifier,
        passwords=PasswordChecker(like=gw.users[0].password_hash if gw.users else None),
        limiter=limiter if limiter is not None else make_limiter(settings.redis_url),
        metrics=GatewayMetrics(),
        correlator=ResultCorrelator(settings),
        budgets=BudgetView(settings),
        nodes=NodeView(settings),
        request_timeout_s=(
            request_timeout_s if request_timeout_s is not None else settings.request_timeout_s
        ),
        hmac_key=gw.prompt_hmac_key(settings),
        results=results,
        archiver=ResultArchiver(settings, results, group_id=f"{gw.redis_prefix}-results"),
    )
    state.cache = make_answer_cache(settings, gw, state.metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await wait_for_broker(settings)
        await ensure_topics(settings, {t: topics.PARTITIONS[t] for t in GATEWAY_TOPICS})
        producer = make_producer(settings)
        await producer.start()
        state.producer, state.bus = producer, Bus(producer, settings.topic_namespace)
        await state.correlator.start()
        await state.budgets.start()
        await state.nodes.start()
        await state.archiver.start()
        # The control log (lockdown, halt, config) is folded while the readers get assigned;
        # both are done before the first request is served.
        control_started = asyncio.create_task(control_plane.start(state))
        await routes_console.start(state)  # samples the ledgers the console plots
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    state.correlator.assigned.wait(),
                    state.budgets.assigned.wait(),
                    state.nodes.assigned.wait(),
                ),
                timeout=assignment_wait_s,
            )
        except TimeoutError:
            log.warning(
                "gateway consumers not assigned after %.0fs; /v1/ready says 503", assignment_wait_s
            )
        await control_started
        try:
            yield
        finally:
            await routes_console.stop(state)
            await control_plane.stop(state)
            await state.correlator.stop()
            await state.budgets.stop()
            await state.nodes.stop()
            await state.archiver.stop()
            await state.results.close()
            state.bus = None
            await producer.stop()
            if own_limiter:
                await state.limiter.close()
            if state.cache is not None:
                await state.cache.close()

    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from the gateway itself (no CDN:
    # hospital networks are often offline).
    app = FastAPIOffline(
        title="fedllm gateway",
        version="1.0.0",
        description="Federated, differentially private LLM queries for hospitals.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    app.add_exception_handler(RequestValidationError, invalid_request)
    control_plane.install(app, state)  # lockdown / halt, before routing and authentication
    allow_header.install(app)  # 405: every method of the path, across routers

    app.add_middleware(ObserveRequests, state=state)

    @app.get("/v1/health", response_model=Health, response_model_exclude_none=True, tags=["ops"])
    async def health() -> Health:
        status = settings.data_dir / "run" / "services.json"  # written by `fedllm up`
        try:
            services = json.loads(status.read_text())
        except (OSError, ValueError):
            services = None
        ctl = state.extra.get(control_plane.EXTRA_KEY)
        emergency = ctl.state.view() if ctl is not None else None
        return Health(status="alive", services=services, emergency=emergency)

    @app.get(
        "/v1/ready", response_model=Readiness, tags=["ops"], responses={503: {"model": Readiness}}
    )
    async def ready(st: State) -> JSONResponse:
        readiness = await is_ready(st)
        return JSONResponse(
            status_code=200 if readiness.ready else 503, content=readiness.model_dump()
        )

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics(st: State) -> Response:
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(routes_auth.router)
    app.include_router(routes_inference.build_router(inference_body_model(settings)))
    app.include_router(routes_budget.router)
    app.include_router(routes_admin.build_router(settings))
    app.include_router(routes_emergency.build_router())
    app.include_router(routes_nodes_config.build_router())
    app.include_router(routes_console.build_router())
    return app

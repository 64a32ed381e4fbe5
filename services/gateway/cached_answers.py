"""POST /v1/inference's answer-cache hook: the request's key, and serving a hit.

Called after authorisation and rate limiting, so a hit passes exactly the checks a fresh
answer passes, and before anything is produced, so a hit never reaches the accountant: no
reservation, no ledger row, no charge.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import HTTPException

from fedllm.common.audit import prompt_hmac
from fedllm.common.config import Settings
from fedllm.services.gateway.answer_cache import (
    UNKNOWN_VERSION,
    AnswerCache,
    CachedRelease,
    CacheKey,
    cache_content,
)
from fedllm.services.gateway.bodies import CachedReleaseInfo, InferenceBodyBase, InferenceResponse
from fedllm.services.gateway.deps import GatewayState
from fedllm.services.gateway.routes_budget import budget_of
from fedllm.services.gateway.settings import GatewaySettings


def make_answer_cache(settings: Settings, gw: GatewaySettings, registry: Any) -> AnswerCache | None:
    """The cache, or None when it is disabled or no Redis URL is configured."""
    url = gw.cache.redis_url or settings.redis_url
    if not (gw.cache.enabled and url):
        return None
    return AnswerCache(
        url,
        secret=gw.cache_secret(settings),
        prefix=gw.redis_prefix,
        ttl_s=gw.cache.ttl_s,
        max_entries=gw.cache.max_entries,
        epsilon_step=gw.cache.epsilon_step,
        registry=registry,
        timeout_s=gw.cache.timeout_s,
        outage_backoff_s=gw.cache.outage_backoff_s,
    )


def data_versions(state: GatewayState) -> dict[str, str]:
    """Every configured hospital's announced data version (from its latest heartbeat)."""
    out = {}
    for h in state.settings.hospitals:
        beat = state.nodes.nodes.get(h.id)
        out[h.id] = beat.get("data_version", "") if beat is not None else UNKNOWN_VERSION
    return out


def request_key(state: GatewayState, body: InferenceBodyBase, department: str) -> CacheKey | None:
    """The cache key of a validated, authorised request; None when the cache is off."""
    cache = state.cache
    if cache is None:
        return None
    content = cache_content(
        kind=body.kind,
        prompt=body.prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        require_consensus=body.require_consensus,
        epsilon=body.privacy_budget,
        epsilon_step=cache.epsilon_step,
        delta=state.settings.budget.delta,
        department=department,
        hospitals=body.hospitals,
        versions=data_versions(state),
    )
    return cache.key(content)


async def serve_hit(
    *,
    state: GatewayState,
    cache: AnswerCache,
    principal: Any,
    department: str,
    address: str,
    body: InferenceBodyBase,
    hit: CachedRelease,
    started: float,
) -> InferenceResponse:
    """Answer with a cached release, audited like an answer: who received which release."""
    request_id = str(uuid.uuid4())
    who = {
        "request_id": request_id,
        "user_id": principal.user_id,
        "role": principal.role,
        "department": department,
        "source_address": address,
    }
    served = {
        "served_from": "cache",
        "release_id": hit.release_id,
        "released_at_ms": str(hit.released_at_ms),
    }
    try:
        await state.audit(
            action="request.received",
            id_parts=(request_id,),
            required=True,
            outcome="accepted",
            epsilon=body.privacy_budget,
            delta=state.settings.budget.delta,
            kind=body.kind,
            prompt_hmac=prompt_hmac(state.hmac_key, body.prompt),
            **who,
            **served,
        )
        await state.audit(
            action="request.completed",
            id_parts=(request_id,),
            required=True,
            outcome="ok",
            epsilon=0.0,
            delta=state.settings.budget.delta,
            hospital_id=hit.node_id,
            **who,
            **served,
        )
    except Exception:
        raise HTTPException(503, "broker unavailable") from None
    state.metrics.inference.labels("ok").inc()
    cache.metrics.epsilon_saved.labels(department).inc(hit.privacy_cost)
    remaining = budget_of(
        state=state, user_id=principal.user_id, department=department, now_s=time.time()
    ).remaining
    return InferenceResponse(
        request_id=request_id,
        response=hit.response,
        privacy_cost=0.0,
        remaining_budget=remaining,
        node_id=hit.node_id,
        processing_time=time.monotonic() - started,
        model_time=0.0,
        is_private=hit.is_private,
        tokens=hit.tokens,
        cached=True,
        cached_release=CachedReleaseInfo(
            release_id=hit.release_id,
            released_at_ms=hit.released_at_ms,
            privacy_cost=hit.privacy_cost,
            epsilon=hit.epsilon,
        ),
    )

"""Test peers on the real broker: an accountant stand-in that answers requests, budget
snapshots, and a running gateway app (lifespan + httpx over ASGI)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from aiokafka import TopicPartition
from fastapi import FastAPI

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, ensure_topics, make_consumer, make_producer, now_ms
from fedllm.services.gateway.app import create_app
from fedllm.services.gateway.settings import GatewaySettings
from fedllm.services.gateway.tokens import mint_token
from tests.kafka_helpers import unique_namespace

SECRET = "test-gateway-secret-0123456789abcdefghijklmnop"

Behaviour = Callable[[dict[str, Any]], dict[str, Any] | list[dict[str, Any]] | None]


def make_settings(kafka_bootstrap: str, **kw: Any) -> Settings:
    """Gateway test settings, in a topic namespace of their own (unless `topic_namespace`)."""
    base: dict[str, Any] = {
        "mode": "prod",
        "kafka_bootstrap": kafka_bootstrap,
        "topic_namespace": unique_namespace(),
        "jwt_secret": SECRET,
        "redis_url": "",
        "request_timeout_s": 10.0,
    }
    base.update(kw)
    return Settings(**base)


def token(
    settings: Settings,
    user_id: str,
    *,
    department: str = "cardiology",
    role: str = "doctor",
    **kw: Any,
) -> dict[str, str]:
    t = mint_token(settings, user_id=user_id, department=department, role=role, kid="k1", **kw)
    return {"Authorization": f"Bearer {t}"}


def ok_result(request: dict[str, Any], **kw: Any) -> dict[str, Any]:
    result = {
        "request_id": request["request_id"],
        "user_id": request["user_id"],
        "department": request["department"],
        "status": "ok",
        "response": f"answer to {request['kind']}",
        "node_id": "st_mary",
        "is_private": True,
        "privacy_cost": request["epsilon"],
        "delta": request["delta"],
        "remaining_budget": 10.0 - request["epsilon"],
        "tokens": 7,
        "processing_time_ms": 12.5,
        "finished_at_ms": now_ms(),
    }
    result.update(kw)
    return result


def budget_status(
    user_id: str,
    department: str,
    *,
    spent: float,
    limit: float = 10.0,
    dept_limit: float = 15.0,
    dept_remaining: float = 12.0,
    window_start: int | None = None,
    window_seconds: int = 86_400,
) -> dict[str, Any]:
    ws = window_start if window_start is not None else int(time.time()) - 60
    return {
        "user_id": user_id,
        "department": department,
        "window_start": ws,
        "window_seconds": window_seconds,
        "delta": 1e-5,
        "user_limit_epsilon": limit,
        "user_spent_epsilon": spent,
        "user_remaining_epsilon": limit - spent,
        "department_limit_epsilon": dept_limit,
        "department_remaining_epsilon": dept_remaining,
        "updated_at_ms": now_ms(),
    }


async def prepare_topics(settings: Settings) -> None:
    await ensure_topics(settings, topics.all_topics([]))


class FakeAccountant:
    """A real peer on the broker: reads REQUESTS, answers on RESULTS via `behaviour`."""

    def __init__(self, settings: Settings, behaviour: Behaviour) -> None:
        self.settings = settings
        self.behaviour = behaviour
        self.seen: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeAccountant:
        await prepare_topics(self.settings)
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.bus = Bus(self.producer, self.settings.topic_namespace)
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        await self.consumer.topics()
        requests = topics.scoped(self.settings, topics.REQUESTS)
        tps = [
            TopicPartition(requests, p)
            for p in sorted(self.consumer.partitions_for_topic(requests) or [])
        ]
        assert tps, "requests topic has no partitions"
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for msg in records:
                    req = codec.decode_expect("InferenceRequest", msg.value, msg.headers)
                    self.seen.append(req)
                    result = self.behaviour(req)
                    results = result if isinstance(result, list) else [result]
                    for res in results:
                        if res is not None:
                            await self.bus.send(
                                topics.RESULTS, "InferenceResult", res, key=req["request_id"]
                            )

    async def publish_budget(self, status: dict[str, Any]) -> None:
        await self.bus.send(topics.BUDGETS, "BudgetStatus", status, key=status["user_id"])

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()
        await self.producer.stop()


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    *,
    gateway_settings: GatewaySettings | None = None,
    client_address: str = "10.0.0.1",
    **kw: Any,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A gateway app with its lifespan running and an httpx client speaking ASGI to it."""
    gw = gateway_settings if gateway_settings is not None else GatewaySettings()
    app = create_app(settings, gateway_settings=gw, **kw)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(client_address, 40000))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=30
        ) as client:
            yield app, client


class AuditTap:
    """Reads the audit topic from (about) now; `wait_for` returns the first matching event."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> AuditTap:
        await prepare_topics(self.settings)
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        await self.consumer.topics()
        audit_topic = topics.scoped(self.settings, topics.AUDIT)
        tps = [
            TopicPartition(audit_topic, p)
            for p in sorted(self.consumer.partitions_for_topic(audit_topic) or [])
        ]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0
    ) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for ev in self.events:
                if match(ev):
                    return ev
            if time.monotonic() > deadline:
                return None
            for recs in (await self.consumer.getmany(timeout_ms=100)).values():
                for m in recs:
                    self.events.append(codec.decode_expect("AuditEvent", m.value, m.headers))

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()

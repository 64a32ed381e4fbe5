"""The admin API on the real broker: RBAC, budget-reset requests on fedllm.admin (+ audit), the
node registry from heartbeats, and a configuration view without secrets."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from aiokafka import TopicPartition
from pydantic import SecretStr

from fedllm.common import codec, topics
from fedllm.common.kafka import Bus, make_consumer, make_producer, now_ms
from fedllm.services.gateway.ratelimit import MemoryRateLimiter
from fedllm.services.gateway.routes_admin import redact_url
from fedllm.services.gateway.settings import GatewaySettings, UserRecord
from tests.gateway.peers import SECRET, AuditTap, running_gateway, token

pytestmark = pytest.mark.asyncio(loop_scope="session")

RESET = {"scope": "user", "subject": "dr_who", "reason": "budget exhausted by a test run"}
ENDPOINTS = [
    ("GET", "/v1/admin/nodes", None),
    ("GET", "/v1/admin/config", None),
    ("POST", "/v1/admin/budget/reset", RESET),
]
NON_ADMIN = [
    ("doctor", "cardiology"),
    ("nurse", "emergency"),
    ("researcher", "research"),
    ("dept_head", "cardiology"),
]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def admin(settings, user: str | None = None) -> dict[str, str]:
    return token(settings, user or uid("adm"), role="admin", department="general")


class Tap:
    """Reads one topic from (about) now and decodes every record as `schema`."""

    def __init__(self, settings, topic: str, schema: str) -> None:
        self.settings, self.topic, self.schema = settings, topic, schema
        self.records: list[tuple[bytes | None, dict[str, Any]]] = []

    async def __aenter__(self) -> Tap:
        self.consumer = make_consumer(self.settings, group_id=None)
        await self.consumer.start()
        await self.consumer.topics()
        topic = topics.scoped(self.settings, self.topic)
        tps = [
            TopicPartition(topic, p)
            for p in sorted(self.consumer.partitions_for_topic(topic) or [])
        ]
        assert tps, f"{self.topic} has no partitions"
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        for tp in tps:
            await self.consumer.position(tp)
        return self

    async def wait_for(self, match, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while True:
            for key, rec in self.records:
                if match(rec):
                    return key, rec
            if time.monotonic() > deadline:
                return None
            for recs in (await self.consumer.getmany(timeout_ms=100)).values():
                for m in recs:
                    self.records.append(
                        (m.key, codec.decode_expect(self.schema, m.value, m.headers))
                    )

    async def __aexit__(self, *exc: object) -> None:
        await self.consumer.stop()


@pytest.fixture(scope="module")
async def client(settings):
    gw = GatewaySettings(rate_limit_user=1000)
    async with running_gateway(settings, gateway_settings=gw) as (_, c):
        yield c


# -- RBAC -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "department"), NON_ADMIN, ids=[r for r, _ in NON_ADMIN])
@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS, ids=[p for _, p, _ in ENDPOINTS])
async def test_non_admin_roles_are_refused(settings, client, role, department, method, path, body):
    headers = token(settings, uid(role), role=role, department=department)
    r = await client.request(method, path, json=body, headers=headers)
    assert r.status_code == 403, r.text
    assert r.json()["detail"] == f"role {role!r} may not use the admin API"


async def test_refusal_precedes_body_validation_and_is_audited(settings, client):
    user = uid("nurse")
    async with AuditTap(settings) as tap, Tap(settings, topics.ADMIN, "BudgetAdjustment") as adm:
        r = await client.post(
            "/v1/admin/budget/reset",
            json={"scope": "nope"},
            headers=token(settings, user, role="nurse", department="emergency"),
        )
        assert r.status_code == 403
        ev = await tap.wait_for(lambda e: e["action"] == "access.denied" and e["user_id"] == user)
        assert await adm.wait_for(lambda a: a["actor_user_id"] == user, timeout_s=0.5) is None
    assert ev is not None
    assert ev["reason"] == r.json()["detail"] and ev["role"] == "nurse"
    assert ev["outcome"] == "denied" and ev["details"]["path"] == "/v1/admin/budget/reset"


async def test_admin_endpoints_need_a_token(client):
    for method, path, body in ENDPOINTS:
        r = await client.request(method, path, json=body)
        assert r.status_code == 401, path


async def test_admin_still_cannot_query_patients(settings, client):
    for body in (
        {"prompt": "List recent admissions", "privacy_budget": 0.5},
        {"prompt": '{"metric": "count"}', "privacy_budget": 0.5, "kind": "aggregate"},
    ):
        r = await client.post("/v1/inference", json=body, headers=admin(settings))
        assert r.status_code == 403, r.text


# -- budget reset ---------------------------------------------------------------------------


@pytest.mark.parametrize(("scope", "subject"), [("user", "dr_grey"), ("department", "radiology")])
async def test_reset_publishes_an_adjustment_and_audits_it(settings, client, scope, subject):
    actor = uid("adm")
    reason = f"reset {uuid.uuid4().hex[:6]}: ticket INC-42"
    before = now_ms()
    async with AuditTap(settings) as tap, Tap(settings, topics.ADMIN, "BudgetAdjustment") as adm:
        r = await client.post(
            "/v1/admin/budget/reset",
            json={"scope": scope, "subject": subject, "reason": reason},
            headers=admin(settings, actor),
        )
        assert r.status_code == 202, r.text
        adjustment_id = r.json()["adjustment_id"]
        got = await adm.wait_for(lambda a: a["adjustment_id"] == adjustment_id)
        ev = await tap.wait_for(
            lambda e: (
                e["action"] == "admin.budget_reset_requested" and e["request_id"] == adjustment_id
            )
        )
    assert got is not None
    key, rec = got
    assert key == subject.encode()
    assert rec == {
        "adjustment_id": adjustment_id,
        "action": "reset",
        "scope": scope,
        "subject": subject,
        "reason": reason,
        "actor_user_id": actor,
        "actor_role": "admin",
        "source_address": "10.0.0.1",
        "requested_at_ms": rec["requested_at_ms"],
    }
    assert before <= rec["requested_at_ms"] <= now_ms()
    assert ev is not None
    assert ev["user_id"] == actor and ev["role"] == "admin" and ev["service"] == "gateway"
    assert ev["outcome"] == "accepted" and ev["reason"] == reason
    assert ev["source_address"] == "10.0.0.1"
    assert ev["details"]["scope"] == scope and ev["details"]["subject"] == subject
    assert ev["details"]["adjustment_id"] == adjustment_id


@pytest.mark.parametrize(
    "body",
    [
        {"scope": "department", "subject": "dermatology", "reason": "x"},  # not configured
        {"scope": "user", "subject": "bad user/id", "reason": "x"},  # user id pattern
        {"scope": "user", "subject": "x" * 129, "reason": "x"},
        {"scope": "user", "subject": "", "reason": "x"},
        {"scope": "user", "subject": "dr_grey"},  # reason required
        {"scope": "user", "subject": "dr_grey", "reason": ""},
        {"scope": "user", "subject": "dr_grey", "reason": "   "},
        {"scope": "user", "subject": "dr_grey", "reason": "r" * 501},
        {"scope": "hospital", "subject": "st_mary", "reason": "x"},
        {"scope": "user", "subject": "dr_grey", "reason": "x", "action": "grant"},  # extra field
        {"scope": "user", "subject": 7, "reason": "x"},
    ],
    ids=lambda b: str(sorted(b.items()))[:60],
)
async def test_reset_validation(settings, client, body):
    r = await client.post("/v1/admin/budget/reset", json=body, headers=admin(settings))
    assert r.status_code == 422, r.text


async def test_reset_accepts_the_longest_reason(settings, client):
    r = await client.post(
        "/v1/admin/budget/reset",
        json={"scope": "user", "subject": "a.b@c-d_e", "reason": "r" * 500},
        headers=admin(settings),
    )
    assert r.status_code == 202, r.text


# -- node registry --------------------------------------------------------------------------


def heartbeat(hospital_id: str, *, sent_at_ms: int, **kw: Any) -> dict[str, Any]:
    hb = {
        "hospital_id": hospital_id,
        "departments": ["cardiology", "general"],
        "queue_depth": 2,
        "in_flight": 1,
        "recent_latency_ms": 123.5,
        "model": "SmolLM2-135M-Instruct",
        "device": "cpu",
        "healthy": True,
        "sent_at_ms": sent_at_ms,
    }
    hb.update(kw)
    return hb


class Heartbeats:
    def __init__(self, settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Heartbeats:
        self.producer = make_producer(self.settings)
        await self.producer.start()
        self.bus = Bus(self.producer, self.settings.topic_namespace)
        return self

    async def send(self, hb: dict[str, Any], *, timestamp_ms: int | None = None) -> None:
        value, headers = codec.encode("NodeHeartbeat", hb)
        await self.producer.send_and_wait(
            topics.scoped(self.settings, topics.HEARTBEATS),
            value=value,
            key=hb["hospital_id"].encode(),
            headers=headers,
            timestamp_ms=timestamp_ms,
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()


async def nodes_until(client, headers, done, timeout_s: float = 5.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        r = await client.get("/v1/admin/nodes", headers=headers)
        assert r.status_code == 200, r.text
        nodes = {n["hospital_id"]: n for n in r.json()}
        if done(nodes) or time.monotonic() > deadline:
            return nodes
        await asyncio.sleep(0.05)


async def test_nodes_reflect_fresh_and_stale_heartbeats(settings, client):
    fresh, stale, down = uid("h-fresh"), uid("h-stale"), uid("h-down")
    ttl_ms = int(settings.node_ttl_s * 1000)
    async with Heartbeats(settings) as hbs:
        await hbs.send(heartbeat(fresh, sent_at_ms=now_ms() - 100))  # older one, same node
        await hbs.send(heartbeat(fresh, sent_at_ms=now_ms(), queue_depth=4, device="cuda"))
        await hbs.send(heartbeat(fresh, sent_at_ms=now_ms() - 50, queue_depth=9))  # reordered
        await hbs.send(heartbeat(stale, sent_at_ms=now_ms() - ttl_ms - 10_000))
        await hbs.send(heartbeat(down, sent_at_ms=now_ms(), healthy=False))
    headers = admin(settings)
    nodes = await nodes_until(client, headers, lambda n: {fresh, stale, down} <= set(n))
    assert {fresh, stale, down} <= set(nodes)
    f = nodes[fresh]
    assert f["alive"] is True and f["healthy"] is True
    assert f["queue_depth"] == 4 and f["device"] == "cuda"  # latest by sent_at_ms wins
    assert f["departments"] == ["cardiology", "general"] and f["in_flight"] == 1
    assert f["recent_latency_ms"] == 123.5 and f["model"] == "SmolLM2-135M-Instruct"
    assert set(f) == {
        "hospital_id",
        "departments",
        "queue_depth",
        "in_flight",
        "recent_latency_ms",
        "model",
        "device",
        "healthy",
        "last_seen_ms",
        "alive",
    }
    assert nodes[stale]["alive"] is False
    assert nodes[stale]["last_seen_ms"] < now_ms() - ttl_ms
    assert nodes[down]["alive"] is True and nodes[down]["healthy"] is False


async def test_node_goes_stale_after_ttl(settings):
    quick = settings.model_copy(update={"node_ttl_s": 0.5})
    node = uid("h-quiet")
    async with running_gateway(quick) as (_, c), Heartbeats(quick) as hbs:
        await hbs.send(heartbeat(node, sent_at_ms=now_ms()))
        headers = admin(quick)
        nodes = await nodes_until(c, headers, lambda n: node in n)
        assert nodes[node]["alive"] is True
        await asyncio.sleep(0.7)
        nodes = await nodes_until(c, headers, lambda n: True)
        assert nodes[node]["alive"] is False


async def test_registry_starts_from_node_ttl_ago(settings):
    """A fresh gateway reads heartbeats (by record time) from node_ttl_s ago: it knows nodes
    heard from since then, not ones silent for longer."""
    quick = settings.model_copy(update={"node_ttl_s": 10.0})  # wide: start-up under load
    recent, gone = uid("h-recent"), uid("h-gone")
    async with Heartbeats(quick) as hbs:
        old = now_ms() - 30_000
        await hbs.send(heartbeat(gone, sent_at_ms=old), timestamp_ms=old)
        await hbs.send(heartbeat(recent, sent_at_ms=now_ms()))
    async with running_gateway(quick) as (app, c):
        assert app.state.gateway.nodes.assigned.is_set()
        nodes = await nodes_until(c, admin(quick), lambda n: recent in n)
    assert recent in nodes and nodes[recent]["alive"] is True
    assert gone not in nodes


# -- configuration --------------------------------------------------------------------------


async def test_config_has_no_secrets(settings, users_with_hashes):
    db_password, redis_password = "db-Pa55-" + uuid.uuid4().hex, "rd-Pa55-" + uuid.uuid4().hex
    previous_key, hmac_key = "prev-key-" + uuid.uuid4().hex, "hmac-key-" + uuid.uuid4().hex
    s = settings.model_copy(
        update={
            "database_url": f"postgresql+psycopg://fedllm:{db_password}@db:5432/fedllm"
            f"?sslmode=require&password={db_password}",
            "redis_url": f"redis://:{redis_password}@cache:6379/0",
        }
    )
    gw = GatewaySettings(
        users=users_with_hashes,
        jwt_previous_keys={"2025-05": SecretStr(previous_key)},
        audit_hmac_key=SecretStr(hmac_key),
    )
    async with (
        AuditTap(s) as tap,
        running_gateway(s, gateway_settings=gw, limiter=MemoryRateLimiter()) as (_, c),
    ):
        actor = uid("adm")
        r = await c.get("/v1/admin/config", headers=admin(s, actor))
        assert r.status_code == 200, r.text
        ev = await tap.wait_for(
            lambda e: e["action"] == "admin.config_read" and e["user_id"] == actor
        )
    assert ev is not None
    text = r.text
    secrets = [
        SECRET,
        db_password,
        redis_password,
        previous_key,
        hmac_key,
        *(u.password_hash for u in users_with_hashes),
    ]
    for secret in secrets:
        assert secret not in text
    body = r.json()
    assert body["departments"] == sorted(settings.budget.department_epsilon)
    assert body["budget"]["department_epsilon"] == settings.budget.department_epsilon
    assert body["budget"]["user_epsilon"] == settings.budget.user_epsilon
    assert [h["id"] for h in body["hospitals"]] == [h.id for h in settings.hospitals]
    assert body["limits"]["max_prompt_chars"] == settings.max_prompt_chars
    assert body["limits"]["rate_limit_user"] == gw.rate_limit_user
    assert body["auth"]["jwt_kid"] == "k1"
    assert body["auth"]["jwt_previous_kids"] == ["2025-05"]
    assert body["auth"]["users"] == [
        {"username": "u1", "department": "cardiology", "role": "doctor", "disabled": False}
    ]
    infra = body["infrastructure"]
    assert infra["database_url"] == (
        "postgresql+psycopg://fedllm:***@db:5432/fedllm?sslmode=require&password=***"
    )
    assert infra["redis_url"] == "redis://:***@cache:6379/0"
    assert infra["kafka_bootstrap"] == settings.kafka_bootstrap


@pytest.fixture
def users_with_hashes() -> list[UserRecord]:
    from argon2 import PasswordHasher

    hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    return [
        UserRecord(
            username="u1",
            department="cardiology",
            role="doctor",
            password_hash=hasher.hash("pw-" + uuid.uuid4().hex),
        )
    ]


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("", ""),
        ("sqlite:////data/fedllm.db", "sqlite:////data/fedllm.db"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://:pw@cache:6379", "redis://:***@cache:6379"),
        ("postgresql://u:p@ss@h/d", "postgresql://u:***@h/d"),
        (
            "postgresql://u@h/d?api_key=k&sslmode=verify-full",
            "postgresql://u@h/d?api_key=***&sslmode=verify-full",
        ),
        ("broker-1:9092,broker-2:9092", "broker-1:9092,broker-2:9092"),
    ],
)
async def test_redact_url(url, want):
    assert redact_url(url) == want

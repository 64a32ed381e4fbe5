"""The DP-aware answer cache against the real Redis and the real broker (a test peer plays the
accountant, so every fresh release it makes is visible in `acct.seen`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as redis

from fedllm.common.config import HospitalConfig
from fedllm.common.kafka import now_ms
from fedllm.services.gateway.answer_cache import (
    cache_content,
    canonical_query,
    epsilon_grid_index,
    make_key,
    normalise_question,
)
from fedllm.services.gateway.settings import CacheSettings, GatewaySettings
from tests.gateway.peers import (
    SECRET,
    AuditTap,
    FakeAccountant,
    make_settings,
    ok_result,
    prepare_topics,
    running_gateway,
    token,
)
from tests.gateway.test_admin import Heartbeats, heartbeat

pytestmark = pytest.mark.asyncio(loop_scope="session")

QUESTION = "How many of our patients on warfarin are over 80?"
AGGREGATE = {"op": "count", "where": {"medication": "warfarin", "age_min": 80}}


def uid(p: str = "u") -> str:
    return f"{p}-{uuid.uuid4().hex[:10]}"


def ask(prompt: str = QUESTION, *, epsilon: float = 0.5, **kw: Any) -> dict[str, Any]:
    body = {
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0.2,
        "privacy_budget": epsilon,
        "require_consensus": False,
        "priority": "normal",
    }
    body.update(kw)
    return body


def agg(query: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return ask(json.dumps(query), kind="aggregate", **kw)


def fresh_release(req: dict[str, Any]) -> dict[str, Any]:
    """A release whose text is unique per request: two fresh releases never look alike."""
    return ok_result(
        req,
        response=f"release {req['request_id'][:8]}",
        node_id="h",
        privacy_cost=req["epsilon"] * 0.9,
    )


@pytest.fixture(scope="module")
def hospitals() -> list[HospitalConfig]:
    return [HospitalConfig(id=uid("h"), departments=["cardiology", "general"]) for _ in range(2)]


@pytest.fixture(scope="module")
async def settings(kafka_bootstrap, redis_url, hospitals):
    s = make_settings(
        kafka_bootstrap, redis_url=redis_url, hospitals=hospitals, request_timeout_s=30.0
    )
    await prepare_topics(s)
    return s


def gw(**cache: Any) -> GatewaySettings:
    """A fresh key space; Redis calls may take 2 s here (a loaded test machine is no outage)."""
    cache = {"timeout_s": 2.0, **cache}
    return GatewaySettings(
        redis_prefix=f"fedllm:test:{uuid.uuid4().hex[:8]}", cache=CacheSettings(**cache)
    )


def sent_by(acct: FakeAccountant, user: str) -> list[dict[str, Any]]:
    return [q for q in acct.seen if q["user_id"] == user]


# -- keys ---------------------------------------------------------------------------------------


async def test_key_normalises_content_and_hides_it():
    assert normalise_question("  How MANY  patients\tover 80 ?? ") == "how many patients over 80"
    assert canonical_query('{"b": 1, "a": {"y": 2, "x": 1}}') == '{"a":{"x":1,"y":2},"b":1}'
    assert [epsilon_grid_index(e, step=0.1) for e in (0.01, 0.5, 0.54, 0.56, 2.0)] == [
        1,
        5,
        5,
        6,
        20,
    ]

    def key(**kw: Any) -> str:
        base = dict(
            kind="generate",
            prompt=QUESTION,
            max_tokens=16,
            temperature=0.2,
            require_consensus=False,
            epsilon=0.5,
            epsilon_step=0.1,
            delta=1e-5,
            department="cardiology",
            hospitals=["a"],
            versions={"a": "v1", "b": "v1"},
        )
        base.update(kw)
        return make_key(b"k" * 32, cache_content(**base)).digest

    same = key()
    assert key(prompt=QUESTION.upper() + "  ") == same
    assert key(epsilon=0.53) == same
    assert key(department="general") == same  # explicit hospitals: department does not route
    assert key(versions={"a": "v1", "b": "v2"}) == same  # b is not in the scope
    for changed in (
        dict(epsilon=0.6),
        dict(max_tokens=17),
        dict(temperature=0.3),
        dict(hospitals=["a", "b"]),
        dict(versions={"a": "v2"}),
        dict(require_consensus=True),
        dict(kind="aggregate", prompt="{}"),
        dict(delta=1e-6),
    ):
        assert key(**changed) != same, changed
    # Router chooses: every hospital is in the scope, and the department steers the route.
    routed = key(hospitals=[])
    assert key(hospitals=[], department="general") != routed
    assert key(hospitals=[], versions={"a": "v1", "b": "v2"}) != routed
    assert (
        make_key(
            b"other-secret",
            cache_content(
                kind="generate",
                prompt=QUESTION,
                max_tokens=16,
                temperature=0.2,
                require_consensus=False,
                epsilon=0.5,
                epsilon_step=0.1,
                delta=1e-5,
                department="cardiology",
                hospitals=["a"],
                versions={"a": "v1"},
            ),
        ).digest
        != same
    )
    assert "warfarin" not in same


# -- same question, same release ------------------------------------------------------------------


async def test_repeat_is_the_same_release_and_charges_nothing(settings, redis_url):
    user, other = uid(), uid()
    g = gw()
    async with (
        FakeAccountant(settings, fresh_release) as acct,
        running_gateway(settings, gateway_settings=g) as (app, c),
    ):
        first = await c.post("/v1/inference", json=ask(), headers=token(settings, user))
        assert first.status_code == 200, first.text
        f = first.json()
        assert f["cached"] is False and f["cached_release"] is None
        assert f["privacy_cost"] == pytest.approx(0.45)

        again = await c.post(
            "/v1/inference",
            headers=token(settings, user),
            json=ask("  how many of our PATIENTS on warfarin are over 80 ", epsilon=0.52),
        )
        assert again.status_code == 200, again.text
        a = again.json()
        assert a["cached"] is True and a["response"] == f["response"]
        assert a["privacy_cost"] == 0.0 and a["request_id"] != f["request_id"]
        assert a["tokens"] == f["tokens"] and a["node_id"] == f["node_id"]
        rel = a["cached_release"]
        assert rel["release_id"] == f["request_id"]
        assert rel["privacy_cost"] == pytest.approx(0.45) and rel["epsilon"] == 0.5
        assert abs(rel["released_at_ms"] - now_ms()) < 60_000

        # Another clinician of the same department gets the same release, also for free.
        third = (await c.post("/v1/inference", json=ask(), headers=token(settings, other))).json()
        assert third["cached"] is True and third["response"] == f["response"]

        # Only the first request ever reached the accountant: nothing reserved or charged.
        assert len(sent_by(acct, user)) == 1 and sent_by(acct, other) == []

        # Different public parameters are different releases.
        for body in (
            ask(epsilon=1.0),
            ask(max_tokens=17),
            ask(temperature=0.3),
            ask(hospitals=[settings.hospitals[0].id]),
        ):
            r = (await c.post("/v1/inference", json=body, headers=token(settings, user))).json()
            assert r["cached"] is False and r["response"] != f["response"], body
        assert len(sent_by(acct, user)) == 5

        # Aggregate queries are keyed by their canonical JSON.
        q1 = await c.post("/v1/inference", json=agg(AGGREGATE), headers=token(settings, user))
        reordered = {"where": {"age_min": 80, "medication": "warfarin"}, "op": "count"}
        q2 = await c.post("/v1/inference", json=agg(reordered), headers=token(settings, user))
        assert q1.json()["cached"] is False and q2.json()["cached"] is True
        assert q2.json()["response"] == q1.json()["response"]

        # Redis holds no question and no answer text: keys are HMACs, values ciphertext.
        r = redis.Redis.from_url(redis_url)
        try:
            keys = [k async for k in r.scan_iter(f"{g.redis_prefix}:cache:*")]
            assert keys
            for k in keys:
                kind = await r.type(k)
                blob = repr(k) + repr(
                    await r.get(k)
                    if kind == b"string"
                    else await r.zrange(k, 0, -1)
                    if kind == b"zset"
                    else await r.smembers(k)
                    if kind == b"set"
                    else b""
                )
                for secret_text in ("warfarin", "release ", f["response"]):
                    assert secret_text not in blob, (k, blob)
        finally:
            await r.aclose()

        metrics = (await c.get("/metrics")).text
        assert 'fedllm_gateway_cache_lookups_total{outcome="hit"} 3.0' in metrics
        assert "fedllm_gateway_cache_hit_ratio 0.3" in metrics  # 3 hits of 9 lookups
        saved = [
            line
            for line in metrics.splitlines()
            if line.startswith('fedllm_gateway_cache_epsilon_saved_total{department="cardiology"}')
        ]
        assert saved and float(saved[0].split()[-1]) == pytest.approx(3 * 0.45)


async def test_refused_and_failed_answers_are_not_cached(settings):
    user = uid()
    outcomes = iter(["rejected", "failed", "ok", "unused"])

    def behave(req: dict[str, Any]) -> dict[str, Any]:
        status = next(outcomes)
        if status == "ok":
            return fresh_release(req)
        return ok_result(req, status=status, response="", is_private=False, reason=status)

    async with (
        FakeAccountant(settings, behave) as acct,
        running_gateway(settings, gateway_settings=gw()) as (_, c),
    ):
        codes = [
            (await c.post("/v1/inference", json=ask(), headers=token(settings, user)))
            for _ in range(4)
        ]
    assert [r.status_code for r in codes] == [403, 502, 200, 200]
    assert codes[2].json()["cached"] is False and codes[3].json()["cached"] is True
    assert len(sent_by(acct, user)) == 3


# -- who may receive it ----------------------------------------------------------------------------


async def test_hits_pass_the_same_rbac_and_are_audited_without_phi(settings):
    doctor, nurse, researcher = uid(), uid(), uid()
    with_name = {"op": "count", "where": {"medication": "warfarin"}, "name": "x"}
    async with (
        FakeAccountant(settings, fresh_release) as acct,
        AuditTap(settings) as tap,
        running_gateway(settings, gateway_settings=gw()) as (_, c),
    ):
        first = await c.post("/v1/inference", json=agg(AGGREGATE), headers=token(settings, doctor))
        named = await c.post("/v1/inference", json=agg(with_name), headers=token(settings, doctor))
        assert first.status_code == 200
        assert named.status_code == 422  # "name" is no part of the nodes' query grammar
        # A nurse may not run aggregates: refused even though the release is cached.
        r = await c.post(
            "/v1/inference", json=agg(AGGREGATE), headers=token(settings, nurse, role="nurse")
        )
        assert r.status_code == 403
        # Another department may not be asked for, cached or not.
        r = await c.post(
            "/v1/inference",
            json=agg(AGGREGATE, department="general"),
            headers=token(settings, doctor),
        )
        assert r.status_code == 403
        # A researcher may not name identifying fields, cached or not.
        r = await c.post(
            "/v1/inference",
            json=agg(with_name),
            headers=token(settings, researcher, role="researcher"),
        )
        assert r.status_code == 403
        ok = await c.post(
            "/v1/inference",
            json=agg(AGGREGATE),
            headers=token(settings, researcher, role="researcher"),
        )
        assert ok.status_code == 200 and ok.json()["cached"] is True
        hit_id = ok.json()["request_id"]

        done = await tap.wait_for(
            lambda e: e["request_id"] == hit_id and e["action"] == "request.completed"
        )
        received = await tap.wait_for(
            lambda e: e["request_id"] == hit_id and e["action"] == "request.received"
        )
    assert sent_by(acct, researcher) == [] and sent_by(acct, nurse) == []
    assert done is not None and received is not None
    assert done["user_id"] == researcher and done["role"] == "researcher"
    assert done["department"] == "cardiology" and done["outcome"] == "ok"
    assert done["epsilon"] == 0.0 and done["hospital_id"] == "h"
    assert done["details"]["served_from"] == "cache"
    assert done["details"]["release_id"] == first.json()["request_id"]
    assert len(received["prompt_hmac"]) == 64
    text = json.dumps([done, received])
    assert "warfarin" not in text and first.json()["response"] not in text


# -- data changes ---------------------------------------------------------------------------------


async def _versions_seen(app, hospital: str, version: str) -> None:
    nodes = app.state.gateway.nodes.nodes
    for _ in range(100):
        if nodes.get(hospital, {}).get("data_version") == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gateway never saw {hospital} at {version}")


async def test_new_data_version_and_erasure_retire_releases(settings):
    user = uid()
    h0, h1 = (h.id for h in settings.hospitals)
    at_h0 = ask(hospitals=[h0])
    at_h1 = ask(hospitals=[h1])
    g = gw()
    async with (
        FakeAccountant(settings, fresh_release) as acct,
        Heartbeats(settings) as hbs,
        running_gateway(settings, gateway_settings=g) as (app, c),
    ):
        cache = app.state.gateway.cache

        async def post(body: dict[str, Any]) -> dict[str, Any]:
            r = await c.post("/v1/inference", json=body, headers=token(settings, user))
            assert r.status_code == 200, r.text
            return r.json()

        for h in (h0, h1):
            await hbs.send(heartbeat(h, sent_at_ms=now_ms(), data_version="2026-01"))
            await _versions_seen(app, h, "2026-01")
        v1 = await post(at_h0)
        await post(at_h1)
        assert (await post(at_h0))["cached"] is True
        assert await cache.size() == 2

        # New data at h0: its releases are retired (deleted), h1's stay.
        await hbs.send(heartbeat(h0, sent_at_ms=now_ms(), data_version="2026-02"))
        await _versions_seen(app, h0, "2026-02")
        v2 = await post(at_h0)
        assert v2["cached"] is False and v2["response"] != v1["response"]
        assert await cache.size() == 2  # h0's old release deleted, its new one stored
        assert (await post(at_h1))["cached"] is True

        # An erasure at h1: the operator retires its releases at once.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fedllm",
            "cache",
            "retire",
            "--hospital",
            h1,
            env={
                **os.environ,
                "REDIS_URL": settings.redis_url,
                "JWT_SECRET": SECRET,
                "FEDLLM_MODE": "prod",
                "FEDLLM_GATEWAY_REDIS_PREFIX": g.redis_prefix,
            },
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and out.decode() == f"{h1}: 1 cached releases retired\n"
        assert (await post(at_h1))["cached"] is False
        assert (await post(at_h0))["cached"] is True
    assert len(sent_by(acct, user)) == 4


# -- caching cannot leak ---------------------------------------------------------------------------


async def test_hits_depend_on_the_request_history_not_on_the_records(settings):
    """Replay one request stream against two different "data sets" (different answers, and one
    of them fails its first attempt at a question other than the one under test): the
    hit/miss pattern of every request is identical."""
    stream = [
        ask("q1"),
        ask("q2"),
        ask("q1"),
        agg(AGGREGATE),
        ask("q2"),
        ask("q1", epsilon=2),
        agg(AGGREGATE),
        ask("q1"),
        ask("q1", epsilon=2.04),
    ]

    async def pattern(answer: str) -> list[bool]:
        user = uid()

        def behave(req: dict[str, Any]) -> dict[str, Any]:
            return ok_result(req, response=f"{answer} {uuid.uuid4().hex}")

        async with (
            FakeAccountant(settings, behave),
            running_gateway(settings, gateway_settings=gw()) as (_, c),
        ):
            out = []
            for body in stream:
                r = await c.post("/v1/inference", json=body, headers=token(settings, user))
                assert r.status_code == 200, r.text
                out.append(r.json()["cached"])
            return out

    a, b = await pattern("few patients"), await pattern("many patients")
    assert a == b == [False, False, True, False, True, False, True, True, True]


async def test_concurrent_identical_requests_share_one_release(settings):
    """Single flight: fifteen identical requests at once cause one fresh release, so the
    averaging attack cannot be run in parallel either."""
    user = uid()
    async with (
        FakeAccountant(settings, fresh_release) as acct,
        running_gateway(settings, gateway_settings=gw()) as (_, c),
    ):
        rs = await asyncio.gather(
            *[
                c.post(
                    "/v1/inference", json=ask("parallel question"), headers=token(settings, user)
                )
                for _ in range(15)
            ]
        )
    assert all(r.status_code == 200 for r in rs)
    assert len({r.json()["response"] for r in rs}) == 1
    assert sorted(r.json()["cached"] for r in rs) == [False] + [True] * 14
    assert len(sent_by(acct, user)) == 1


# -- policy and operations -------------------------------------------------------------------------


async def test_size_bound_evicts_least_recently_used_and_ttl_expires(settings):
    user = uid()

    async def cached(c: Any, prompt: str) -> bool:
        r = await c.post("/v1/inference", json=ask(prompt), headers=token(settings, user))
        assert r.status_code == 200, r.text
        return r.json()["cached"]

    async with FakeAccountant(settings, fresh_release):
        async with running_gateway(settings, gateway_settings=gw(max_entries=2)) as (app, c):
            assert [await cached(c, p) for p in ("a", "b", "a", "c")] == [False, False, True, False]
            assert await app.state.gateway.cache.size() == 2
            assert await cached(c, "a") is True  # used recently: kept
            assert await cached(c, "b") is False  # least recently used: evicted
            metrics = (await c.get("/metrics")).text
            assert 'fedllm_gateway_cache_retired_total{why="size_bound"}' in metrics

        async with running_gateway(settings, gateway_settings=gw(ttl_s=1)) as (app, c):
            cache = app.state.gateway.cache
            assert await cached(c, "short-lived") is False
            [entry] = [k async for k in cache.client.scan_iter(f"{cache.prefix}:e:*")]
            assert 0 < await cache.client.pttl(entry) <= 1000
            await asyncio.sleep(1.2)
            assert await cached(c, "short-lived") is False  # expired


async def test_redis_that_is_down_means_fresh_releases_not_errors(settings):
    user = uid()
    down = gw(redis_url="redis://127.0.0.1:1/0")
    s = settings.model_copy(update={"redis_url": ""})  # rate limits in process
    async with (
        FakeAccountant(s, fresh_release) as acct,
        running_gateway(s, gateway_settings=down) as (_, c),
    ):
        rs = [await c.post("/v1/inference", json=ask(), headers=token(s, user)) for _ in range(3)]
        metrics = (await c.get("/metrics")).text
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert [r.json()["cached"] for r in rs] == [False, False, False]
    assert len(sent_by(acct, user)) == 3
    assert 'fedllm_gateway_cache_lookups_total{outcome="unavailable"} 3.0' in metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


async def test_redis_stopping_mid_run_falls_back_to_fresh_releases(settings):
    user = uid()
    s = settings.model_copy(update={"redis_url": ""})
    with redis_server() as (url, proc):
        async with (
            FakeAccountant(s, fresh_release) as acct,
            running_gateway(s, gateway_settings=gw(redis_url=url)) as (_, c),
        ):

            async def post() -> Any:
                return await c.post("/v1/inference", json=ask(), headers=token(s, user))

            assert [(await post()).json()["cached"] for _ in range(2)] == [False, True]
            proc.terminate()
            proc.wait(10)
            after = [await post() for _ in range(2)]
    assert [r.status_code for r in after] == [200, 200]
    assert [r.json()["cached"] for r in after] == [False, False]
    assert len(sent_by(acct, user)) == 3


async def test_nodes_announce_the_configured_data_version(settings):
    from fedllm.common import codec
    from fedllm.services.node_worker.service import NodeState, heartbeat_record

    h = settings.hospitals[0]
    s = settings.model_copy(update={"hospitals": [h.model_copy(update={"data_version": "v7"})]})
    value, headers = codec.encode("NodeHeartbeat", heartbeat_record(s, h.id, NodeState()))
    assert codec.decode_expect("NodeHeartbeat", value, headers)["data_version"] == "v7"


async def test_a_waiter_that_gives_up_leaves_the_fill_lease_to_its_holder(redis_url):
    from prometheus_client import CollectorRegistry

    from fedllm.services.gateway.answer_cache import AnswerCache

    prefix = f"fedllm:test:{uuid.uuid4().hex[:8]}"
    cache = AnswerCache(
        redis_url,
        secret=b"s" * 32,
        prefix=prefix,
        ttl_s=60,
        max_entries=10,
        epsilon_step=0.1,
        registry=CollectorRegistry(),
    )
    key = cache.key({"v": 1, "q": "x", "data": [["h", "v1"]]})
    lease = f"{prefix}:cache:l:{key.digest}"
    leader_has_lease = asyncio.Event()
    follower_done = asyncio.Event()

    async def leader() -> None:
        assert await cache.lookup(key, wait_s=5) is None  # miss: holds the lease
        leader_has_lease.set()
        await follower_done.wait()
        assert await cache.client.exists(lease) == 1  # the follower did not free it
        req = {"request_id": "r1", "epsilon": 1.0}
        await cache.settle(
            key,
            ok_result(
                {**req, "user_id": "u", "department": "d", "kind": "generate", "delta": 1e-5}
            ),
            epsilon=1.0,
        )

    async def follower() -> None:
        await leader_has_lease.wait()
        assert await cache.lookup(key, wait_s=0.2) is None  # gave up waiting
        await cache.settle(key, None, epsilon=1.0)
        follower_done.set()

    try:
        await asyncio.gather(leader(), follower())
        assert await cache.client.exists(lease) == 0
        hit = await cache.lookup(key, wait_s=1)
        assert hit is not None and hit.release_id == "r1"
    finally:
        await cache.client.delete(
            lease,
            f"{prefix}:cache:e:{key.digest}",
            f"{prefix}:cache:lru",
            f"{prefix}:cache:h:h",
            f"{prefix}:cache:v:h",
        )
        await cache.close()

"""Load benchmark: DP aggregate queries through the HTTP gateway, beside the raw 4-hop chain.

Starts the whole pipeline (embedded broker and a SQLite ledger unless KAFKA_BOOTSTRAP /
DATABASE_URL are set), sends aggregate queries (and `--generate-share` of generate requests
with tiny max_tokens) from many users at 1, 8 and 64 in flight, and prints req/s and
p50/p95/p99 of the round trip and of the time outside the model. The baseline, measured on the
same broker in the same run: a raw aiokafka chain of four consume→produce hops (client →
hop 1 → … → hop 4 → client), like gateway → accountant → router → node → accountant → gateway.

History phase: the pipeline is stopped, ≥ `--history` committed ledger rows are written
directly into the current window of the same users and department, and a fresh pipeline
(fresh broker, same ledger) is measured again; it prints with-history / fresh. A fresh broker
keeps the embedded Tansu broker's own decay (its fetch cost grows with stored batches; see the
BROKER notes) out of the ledger's ratio.

Also printed: a per-hop breakdown at 1 in flight from the audit trail, CPU per process under
the 64-in-flight load, and the whole pipeline's CPU while idle.

    python bench/load.py --quick          # a few minutes
    python bench/load.py                  # the full run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from aiokafka import TopicPartition
from sqlalchemy import create_engine, insert, select, update

from fedllm.common import codec, topics
from fedllm.common.config import POPULATION_PRESETS
from fedllm.common.db import normalise_url
from fedllm.common.kafka import ensure_topics, make_consumer, make_producer
from fedllm.launcher import Pipeline, preset_hospitals
from fedllm.privacy.accountant import ZcdpFilter, window_start

DEPARTMENT = "emergency"
EPSILON = 0.01  # small, so that no budget binds however many queries run
AGGREGATE = json.dumps({"op": "count", "where": {"diagnosis": "diabetes"}})
AGGREGATE_BODY = {  # the HTTP body of one aggregate query
    "prompt": AGGREGATE,
    "kind": "aggregate",
    "max_tokens": 1,
    "temperature": 0.0,
    "privacy_budget": EPSILON,
}


WARM_UP = 30  # unmeasured requests at the start of each phase


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


@dataclass
class Stats:
    """Latencies (ms) of one level and its throughput."""

    label: str
    in_flight: int
    total: list[float] = field(default_factory=list)
    outside: list[float] = field(default_factory=list)
    rate: float = 0.0
    failures: int = 0
    ids: list[str] = field(default_factory=list)
    done_ms: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        o = self.outside or self.total
        return (
            f"{self.label:<28} {self.in_flight:>3} in flight: {self.rate:8.1f} req/s   "
            f"p50 {pct(o, 0.5):7.1f}  p95 {pct(o, 0.95):7.1f}  p99 {pct(o, 0.99):7.1f} ms"
            + (f"   failures {self.failures}" if self.failures else "")
        )


# --------------------------------------------------------------------------- raw chain


async def raw_chain(pipeline: Pipeline, *, n: int, in_flight: int) -> Stats:
    """Four plain aiokafka hops (consume, produce on) between a client's produce and consume."""
    s = pipeline.settings
    names = [f"bench.chain.{uuid.uuid4().hex[:6]}.{i}" for i in range(5)]
    await ensure_topics(s, {t: 1 for t in names})
    producer = make_producer(s)
    await producer.start()
    consumers = [make_consumer(s, names[i], group_id=None) for i in range(5)]
    for c in consumers:
        await c.start()

    async def hop(i: int) -> None:
        while True:
            batches = await consumers[i].getmany(timeout_ms=100, max_records=500)
            for records in batches.values():
                for m in records:
                    await producer.send(names[i + 1], m.value, key=m.key)

    waiting: dict[bytes, asyncio.Future[None]] = {}

    async def sink() -> None:
        while True:
            batches = await consumers[4].getmany(timeout_ms=100, max_records=500)
            for records in batches.values():
                for m in records:
                    fut = waiting.pop(m.value[:16], None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    tasks = [asyncio.create_task(hop(i)) for i in range(4)] + [asyncio.create_task(sink())]
    stats = Stats("raw 4-hop aiokafka chain", in_flight)
    loop = asyncio.get_running_loop()

    async def one() -> float:
        key = uuid.uuid4().bytes
        fut = loop.create_future()
        waiting[key] = fut
        t0 = time.perf_counter()
        await producer.send(names[0], key + b"x" * 284)
        await asyncio.wait_for(fut, 30)
        return (time.perf_counter() - t0) * 1000

    try:
        for _ in range(20):  # warm-up: partitions assigned, first fetches done
            await one()
        sem = asyncio.Semaphore(in_flight)

        async def worker() -> None:
            async with sem:
                stats.total.append(await one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n)))
        stats.rate = n / (time.perf_counter() - t0)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in consumers:
            await c.stop()
        await producer.stop()
    return stats


# --------------------------------------------------------------------------- HTTP load


def tokens_for(pipeline: Pipeline, users: int) -> list[tuple[str, str]]:
    from fedllm.services.gateway.tokens import mint_token

    return [
        (
            f"load-{i}",
            mint_token(
                pipeline.settings, user_id=f"load-{i}", department=DEPARTMENT, role="doctor"
            ),
        )
        for i in range(users)
    ]


async def http_level(
    pipeline: Pipeline,
    *,
    label: str,
    n: int,
    in_flight: int,
    users: list[tuple[str, str]],
    generate_share: float,
    seed: int,
) -> Stats:
    stats = Stats(label, in_flight)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=in_flight + 4, max_keepalive_connections=in_flight + 4)
    async with httpx.AsyncClient(
        base_url=pipeline.gateway_url, timeout=120, limits=limits
    ) as client:

        async def one(i: int) -> None:
            _, token = users[i % len(users)]
            if rng.random() < generate_share:
                body: dict[str, Any] = {
                    "prompt": "What is triage?",
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "privacy_budget": EPSILON,
                }
            else:
                body = dict(AGGREGATE_BODY)
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    "/v1/inference", json=body, headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError:
                stats.failures += 1
                return
            total = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                stats.failures += 1
                return
            answer = r.json()
            model_ms = float(answer.get("model_time", 0.0) or 0.0)  # ms
            stats.total.append(total)
            stats.outside.append(total - model_ms)
            stats.ids.append(answer["request_id"])
            stats.done_ms[answer["request_id"]] = time.time() * 1000

        for i in range(min(10, n)):  # warm-up
            await one(i)
        stats.total.clear(), stats.outside.clear(), stats.ids.clear()
        sem = asyncio.Semaphore(in_flight)

        async def worker(i: int) -> None:
            async with sem:
                await one(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(n)))
        stats.rate = len(stats.total) / (time.perf_counter() - t0)
    return stats


# --------------------------------------------------------------------------- per-hop breakdown

HOPS = [
    ("gateway: HTTP in → request.received", None, "request.received"),
    ("gateway → accountant reserve", "request.received", "budget.reserved"),
    ("accountant → router", "budget.reserved", "request.routed"),
    ("router → node answered", "request.routed", "node.answered"),
    ("node → accountant commit", "node.answered", "budget.committed"),
    ("accountant → HTTP response", "budget.committed", None),
]


async def hop_breakdown(pipeline: Pipeline, stats: Stats) -> list[tuple[str, float]]:
    """Median ms per hop from the audit trail's timestamps (ms resolution, one clock)."""
    wanted = set(stats.ids)
    at: dict[str, dict[str, int]] = defaultdict(dict)
    consumer = make_consumer(pipeline.settings, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topics.AUDIT, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for m in records:
                    try:
                        ev = codec.decode_expect("AuditEvent", m.value, m.headers)
                    except codec.DecodeError:
                        continue
                    if ev["request_id"] in wanted:
                        at[ev["request_id"]].setdefault(ev["action"], ev["occurred_at_ms"])
    finally:
        await consumer.stop()
    out = []
    for name, start, end in HOPS:
        xs = []
        for rid in wanted:
            ev = at.get(rid, {})
            if start is None:  # before the gateway's first audit: not stamped, skip
                continue
            t0 = ev.get(start)
            t1 = stats.done_ms.get(rid) if end is None else ev.get(end)
            if t0 is not None and t1 is not None:
                xs.append(t1 - t0)
        if xs:
            out.append((name, statistics.median(xs)))
    return out


# --------------------------------------------------------------------------- CPU


def pipeline_processes(pipeline: Pipeline) -> dict[str, psutil.Process]:
    procs = {name: psutil.Process(p.pid) for name, p in pipeline.procs.items()}
    if pipeline.broker is not None and pipeline.broker.proc is not None:
        procs["broker"] = psutil.Process(pipeline.broker.proc.pid)
    return procs


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            t = p.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = 0.0
    return out


def cpu_share(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {k: (after[k] - before[k]) / wall for k in before}


# --------------------------------------------------------------------------- history


def preload_history(
    database_url: str, *, rows: int, users: list[tuple[str, str]], window_seconds: int, delta: float
) -> float:
    """Write `rows` committed entries into the current window of the bench's users and
    department, and add them to the accounts' running sums; returns seconds taken."""
    from fedllm.services.accountant.tables import Base, BudgetAccount, BudgetEntry

    t0 = time.perf_counter()
    engine = create_engine(normalise_url(database_url))
    Base.metadata.create_all(engine)
    window = window_start(now_s=time.time(), window_seconds=window_seconds)
    f = ZcdpFilter(delta=delta)
    charge = max(1, f.query_units(EPSILON) // 1000)
    now = int(time.time() * 1000)
    per_user: dict[str, int] = defaultdict(int)
    with engine.begin() as conn:
        for start in range(0, rows, 10_000):
            batch = []
            for i in range(start, min(rows, start + 10_000)):
                user = users[i % len(users)][0]
                per_user[user] += charge
                batch.append(
                    {
                        "request_id": f"hist-{uuid.uuid4().hex}",
                        "user_id": user,
                        "department": DEPARTMENT,
                        "window_start": window,
                        "state": "committed",
                        "epsilon": EPSILON,
                        "delta": delta,
                        "reserved_rdp": {},
                        "spent_rdp": None,
                        "spent_epsilon": 0.0,
                        "deadline_ms": now,
                        "created_at_ms": now - 1000,
                        "settled_at_ms": now - 900,
                        "outcome": "ok",
                        "reason": "",
                        "node_id": "",
                        "reserved_units": charge,
                        "charged_units": charge,
                        "user_epoch": 0,
                        "dept_epoch": 0,
                    }
                )
            conn.execute(insert(BudgetEntry), batch)
        scopes = {f"user:{u}": c for u, c in per_user.items()}
        scopes[f"dept:{DEPARTMENT}"] = charge * rows
        existing = {
            r.scope: r
            for r in conn.execute(select(BudgetAccount).where(BudgetAccount.window_start == window))
        }
        for scope, units in scopes.items():
            if scope in existing:
                conn.execute(
                    update(BudgetAccount)
                    .where(
                        BudgetAccount.scope == scope,
                        BudgetAccount.window_start == window,
                    )
                    .values(charged_units=BudgetAccount.charged_units + units)
                )
            else:
                conn.execute(
                    insert(BudgetAccount).values(
                        scope=scope,
                        window_start=window,
                        limit_epsilon=0.0,
                        charged_units=units,
                        epoch=0,
                    )
                )
    engine.dispose()
    return time.perf_counter() - t0


def ledger_decisions(*, history: int, batches: int, batch: int) -> None:
    """The accountant's ledger alone (in process, SQLite): reserve + settle per second in
    batches, on a fresh ledger and after `history` rows of the same users and department."""
    from fedllm.common.config import BudgetConfig
    from fedllm.common.db import make_engine
    from fedllm.privacy.accountant import PrivacyCurve, RdpAccountant
    from fedllm.services.accountant.ledger import Ledger, Settlement

    url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='fedllm-ledger-')) / 'l.db'}"
    ledger = Ledger(make_engine(url), BudgetConfig(), RdpAccountant())
    users = [(f"load-{i}", "") for i in range(500)]
    spent = PrivacyCurve.from_rho(1e-9)

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(batches):
            reqs = [
                {
                    "request_id": uuid.uuid4().hex,
                    "user_id": users[(b * batch + i) % 500][0],
                    "department": DEPARTMENT,
                    "epsilon": EPSILON,
                    "deadline_ms": int(time.time() * 1000) + 60_000,
                }
                for i in range(batch)
            ]
            ledger.reserve_many(reqs)
            ledger.settle_many([Settlement(r["request_id"], spent, "ok") for r in reqs])
        n = batches * batch
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

    run()  # warm-up
    fresh = run()
    preload_history(url, rows=history, users=users, window_seconds=86_400, delta=1e-5)
    hist = run()
    print(
        f"ledger alone (SQLite, batches of {batch}, reserve + settle): fresh {fresh[0]:.0f} "
        f"req/s ({fresh[1]:.0f} per CPU-second); with {history} rows of history "
        f"{hist[0]:.0f} req/s ({hist[1]:.0f} per CPU-second); with-history / fresh "
        f"{hist[0] / fresh[0]:.2f} wall, {hist[1] / fresh[1]:.2f} CPU",
        flush=True,
    )


# --------------------------------------------------------------------------- broker decay


async def decay_windows(
    pipeline: Pipeline,
    users: list[tuple[str, str]],
    *,
    seconds: float,
    window_s: float,
    in_flight: int = 1,
) -> None:
    """`in_flight` requests at a time for `seconds` on one broker: req/s and p95 per window, so
    the embedded broker's decay with stored history (BROKER notes) shows against requests
    served."""
    served = 0
    t_end = time.perf_counter() + seconds
    w = 0
    async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=120) as client:
        while time.perf_counter() < t_end:
            st = Stats(f"window {w}", in_flight)
            t0 = time.perf_counter()

            async def worker(st: Stats = st, t0: float = t0) -> None:
                nonlocal served
                while time.perf_counter() - t0 < window_s:
                    user, token = users[served % len(users)]
                    served += 1
                    s0 = time.perf_counter()
                    r = await client.post(
                        "/v1/inference",
                        json=AGGREGATE_BODY,
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    if r.status_code == 200:
                        st.total.append((time.perf_counter() - s0) * 1000)
                    else:
                        st.failures += 1

            await asyncio.gather(*(worker() for _ in range(in_flight)))
            st.rate = len(st.total) / (time.perf_counter() - t0)
            print(f"{st.line()}   requests served so far {served}", flush=True)
            w += 1


# --------------------------------------------------------------------------- main


def measure(
    pipeline: Pipeline,
    args: argparse.Namespace,
    users: list[tuple[str, str]],
    phase: str,
    *,
    with_raw: bool,
) -> dict[int, Stats]:
    results: dict[int, Stats] = {}
    procs = pipeline_processes(pipeline)
    # Unmeasured warm-up, the same in every phase: a pipeline's first requests after start
    # pay one-off costs (connections, caches, fetch waits still idle).
    asyncio.run(
        http_level(
            pipeline,
            label=f"{phase}: warm-up",
            n=WARM_UP,
            in_flight=1,
            users=users,
            generate_share=0.0,
            seed=0,
        )
    )
    for level in args.levels:
        n = args.requests if level > 1 else max(args.requests // 4, 50)
        if with_raw:
            raw = asyncio.run(raw_chain(pipeline, n=max(n, 200), in_flight=level))
            print(raw.line(), flush=True)
        before, t0 = cpu_seconds(procs), time.perf_counter()
        st = asyncio.run(
            http_level(
                pipeline,
                label=f"{phase}: HTTP aggregate",
                n=n,
                in_flight=level,
                users=users,
                generate_share=args.generate_share,
                seed=level,
            )
        )
        wall = time.perf_counter() - t0
        share = cpu_share(before, cpu_seconds(procs), wall)
        cpu_ms = sum(share.values()) * wall * 1000 / max(len(st.total), 1)
        print(st.line() + f"   CPU {cpu_ms:.1f} ms/req (all processes)", flush=True)
        if level == max(args.levels):
            print(
                "    CPU (cores) under this load: "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(share.items(), key=lambda kv: -kv[1]))
            )
        if level == 1 and with_raw:
            results[-1] = raw
            for name, ms in asyncio.run(hop_breakdown(pipeline, st)):
                print(f"    {name:<36} median {ms:6.1f} ms")
        results[level] = st
    return results


def idle_cpu(pipeline: Pipeline, seconds: float) -> None:
    """The idle pipeline's CPU: just after the load (consumers on the idle fetch wait), then
    once every consumer is on the deep idle wait (`deep_idle_after_ms` without data)."""
    procs = pipeline_processes(pipeline)
    t_load = time.perf_counter()
    deep_s = pipeline.settings.deep_idle_after_ms / 1000
    for label, start_s in (("just after the load", 2.0), ("after the deep idle wait", deep_s + 2)):
        time.sleep(max(0.0, start_s - (time.perf_counter() - t_load)))
        before, t0 = cpu_seconds(procs), time.perf_counter()
        time.sleep(seconds)
        share = cpu_share(before, cpu_seconds(procs), time.perf_counter() - t0)
        print(
            f"idle pipeline, {label}, over {seconds:.0f} s: {sum(share.values()):.3f} cores in "
            "all ("
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(share.items(), key=lambda kv: -kv[1]))
            + ")",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer requests: a few minutes")
    ap.add_argument("--requests", type=int, default=None, help="requests per level")
    ap.add_argument("--levels", default="1,8,64")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument(
        "--generate-share",
        type=float,
        default=0.0,
        help="share of generate requests (max_tokens 1) among the queries",
    )
    ap.add_argument("--history", type=int, default=100_000, help="ledger rows to preload")
    ap.add_argument("--idle-seconds", type=float, default=None)
    ap.add_argument(
        "--data-dir",
        default=".fedllm",
        help="service data (the model's de-quantised cache is reused from here)",
    )
    ap.add_argument(
        "--decay",
        type=float,
        default=0.0,
        help="only measure 1-in-flight throughput per window over this many seconds on one "
        "fresh broker (the embedded broker's decay with history)",
    )
    ap.add_argument("--decay-window", type=float, default=30.0)
    ap.add_argument("--decay-in-flight", type=int, default=1)
    ap.add_argument(
        "--preset",
        choices=sorted(POPULATION_PRESETS),
        default="test",
        help="hospital size (clinosim population; generated once under --data-dir)",
    )
    args = ap.parse_args()
    args.requests = args.requests or (300 if args.quick else 2000)
    args.levels = [int(x) for x in args.levels.split(",")]
    idle_s = args.idle_seconds or (5.0 if args.quick else 20.0)
    data_dir = Path(args.data_dir)
    scratch = Path(tempfile.mkdtemp(prefix="fedllm-load-"))
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{scratch / 'ledger.db'}"
    env = {
        "FEDLLM_GATEWAY_RATE_LIMIT_ADDRESS": "100000000",
        "FEDLLM_GATEWAY_RATE_LIMIT_USER": "100000000",
        "FEDLLM_DP_GROUPS": "4",
    }

    def pipeline() -> Pipeline:  # a fresh broker each time; the same ledger
        return Pipeline(
            data_dir=data_dir,
            database_url=database_url,
            env=env,
            hospitals=preset_hospitals(args.preset),
        )

    if args.decay:
        p = pipeline()
        try:
            p.start(timeout_s=900)
            users = tokens_for(p, args.users)
            asyncio.run(
                decay_windows(
                    p,
                    users,
                    seconds=args.decay,
                    window_s=args.decay_window,
                    in_flight=args.decay_in_flight,
                )
            )
        finally:
            p.stop()
        return
    t_start = time.perf_counter()
    ledger_decisions(history=args.history, batches=20 if args.quick else 100, batch=64)
    p = pipeline()
    try:
        p.start(timeout_s=900)  # a loaded machine loads three models slowly
        print(
            f"broker: {'embedded Tansu' if p.broker else p.bootstrap}; ledger: "
            f"{database_url.split(':')[0]}; hospitals: preset {args.preset} (clinosim population "
            f"{POPULATION_PRESETS[args.preset]}); {args.users} users, department {DEPARTMENT}, "
            f"ε={EPSILON} per query, generate share {args.generate_share}",
            flush=True,
        )
        users = tokens_for(p, args.users)
        fresh = measure(p, args, users, "fresh", with_raw=True)
        idle_cpu(p, idle_s)
    finally:
        p.stop()
    budget = p.settings.budget
    took = preload_history(
        database_url,
        rows=args.history,
        users=users,
        window_seconds=budget.window_seconds,
        delta=budget.delta,
    )
    print(f"history: {args.history} ledger rows written in {took:.1f} s", flush=True)
    p = pipeline()
    try:
        p.start(timeout_s=900)
        users = tokens_for(p, args.users)
        hist = measure(p, args, users, "history", with_raw=False)
    finally:
        p.stop()
    print(
        "with-history / fresh (req/s): "
        + ", ".join(
            f"{lvl} in flight {hist[lvl].rate / fresh[lvl].rate:.2f}" for lvl in args.levels
        )
    )
    raw = fresh.get(-1)
    if raw is not None and 1 in fresh:
        print(
            f"p95 outside the model at 1 in flight / raw 4-hop p95: "
            f"{pct(fresh[1].outside, 0.95) / pct(raw.total, 0.95):.1f}×"
        )
    print(f"total bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()

"""Chaos benchmark (issue 19, items 9–10): the whole pipeline as real processes under load while
services are killed with SIGKILL, Postgres goes down and comes back, and deliveries are
duplicated and reordered; then the invariants are checked and printed as a table.

    python -m bench.chaos --quick                 # ≤ 3 min: ~60 requests, 6 kills, 1 outage
    python -m bench.chaos --requests 10000 --kills 20

Set-up: an embedded broker of its own, a scratch Postgres cluster on a free port (ledger and
audit log), Redis for the gateway's result store when REDIS_URL is set (a key prefix of its
own; without Redis a killed gateway forgets results), two hospitals running the real node
worker with `FEDLLM_NODE_LOAD_MODEL=false` (real records, ledger and DP aggregate mechanisms,
no language model). The load is DP aggregate queries only (count, fanned out to both hospitals
or sent to one): generate is skipped — loading SmolLM2 on every node restart and generating on
this loaded 2-core CPU (seconds per token) would not fit the bounds. The supervisor loop of
`fedllm up` (`Pipeline.supervise`) restarts whatever is killed.

Each caller sends with an `Idempotency-Key`, re-sends the same key after a connection error or
a 503 (a killed gateway), and collects a gateway timeout with `GET /v1/inference/{id}`.

Invariants: every request has exactly one terminal state its caller read; ledger committed ε =
Σ `budget.committed` ε in the audit log = Σ ε of the terminal results published; no budget
account over its limit; `fedllm audit verify` passes; `fedllm compliance-check` passes (every
received request has a terminal audit record); one ledger entry per request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedllm.common.config import HospitalConfig
from fedllm.launcher import Pipeline

DEPARTMENT = "cardiology"
EPSILON = 0.4  # a user limit of 10 binds after ~25 fan-outs: rejections are part of the load
QUERY = json.dumps({"op": "count", "where": {"diagnosis": "diabetes"}})
TERMINAL_HTTP = {200: "ok", 403: "rejected", 502: "failed", 504: "timeout"}


@dataclass
class Caller:
    """What one caller saw."""

    key: str
    user: str
    request_id: str = ""
    terminal: str = ""  # ok | rejected | failed | timeout ("" = never read one)
    privacy_cost: float = 0.0
    resends: int = 0
    reason: str = ""  # the detail of a non-ok terminal answer


@dataclass
class Faults:
    kills: list[tuple[float, str]] = field(default_factory=list)
    pg_outages: list[tuple[float, float]] = field(default_factory=list)
    replayed: int = 0


# -- load ---------------------------------------------------------------------------------------


async def call(
    client: httpx.AsyncClient, caller: Caller, token: str, body: dict, *, give_up_at: float
) -> None:
    """Send (and re-send with the same key) until a terminal answer is read."""
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": caller.key}
    while time.monotonic() < give_up_at:
        try:
            if caller.request_id:
                r = await client.get(f"/v1/inference/{caller.request_id}", headers=headers)
                if r.status_code == 202:
                    await asyncio.sleep(0.5)
                    continue
            else:
                r = await client.post("/v1/inference", json=body, headers=headers)
        except httpx.HTTPError:
            caller.resends += 1
            await asyncio.sleep(0.5)
            continue
        data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code == 504 and not caller.request_id and data.get("request_id"):
            caller.request_id = data["request_id"]  # the gateway gave up waiting: collect it
            continue
        if r.status_code in TERMINAL_HTTP:
            caller.terminal = TERMINAL_HTTP[r.status_code]
            caller.request_id = data.get("request_id", caller.request_id)
            caller.privacy_cost = float(data.get("privacy_cost", 0.0) or 0.0)
            caller.reason = str(data.get("detail", ""))[:80]
            return
        caller.resends += 1  # 503 (no broker / gateway starting), 429, ...
        await asyncio.sleep(0.5)


async def load(
    pipe: Pipeline, n: int, *, users: int, concurrency: int, rng: random.Random, give_up_s: float
) -> list[Caller]:
    from fedllm.services.gateway.tokens import mint_token

    hospitals = [h.id for h in pipe.settings.hospitals]
    tokens = {
        f"chaos-{i}": mint_token(
            pipe.settings, user_id=f"chaos-{i}", department=DEPARTMENT, role="doctor"
        )
        for i in range(users)
    }
    callers = [Caller(key=uuid.uuid4().hex, user=f"chaos-{i % users}") for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    give_up_at = time.monotonic() + give_up_s

    async def one(c: Caller) -> None:
        body = {
            "prompt": QUERY,
            "kind": "aggregate",
            "max_tokens": 1,
            "temperature": 0.0,
            "privacy_budget": EPSILON,
            "department": DEPARTMENT,
            "hospitals": hospitals if rng.random() < 0.5 else [rng.choice(hospitals)],
        }
        async with gate:
            await call(client, c, tokens[c.user], body, give_up_at=give_up_at)

    async with httpx.AsyncClient(base_url=pipe.gateway_url, timeout=60) as client:
        await asyncio.gather(*(one(c) for c in callers))
    return callers


# -- faults -------------------------------------------------------------------------------------


def kill_schedule(pipe: Pipeline, kills: int, window_s: float, rng: random.Random) -> list:
    kinds = ["accountant", "router", "gateway", "auditor"] + [
        f"node-{h.id}" for h in pipe.settings.hospitals
    ]
    order = [kinds[i % len(kinds)] for i in range(kills)]
    rng.shuffle(order)
    return sorted((rng.uniform(0.1, 0.9) * window_s, name) for name in order)


def run_faults(
    pipe: Pipeline,
    cluster: Any,
    schedule: list[tuple[float, str]],
    pg_at: float | None,
    pg_down_s: float,
    faults: Faults,
    stop: threading.Event,
) -> None:
    """Kill -9 the scheduled services (the supervisor restarts them) and take Postgres away."""
    t0 = time.monotonic()
    events: list[tuple[float, str]] = list(schedule)
    if pg_at is not None:
        events.append((pg_at, "postgres"))
    for at, name in sorted(events):
        if stop.wait(max(0.0, at - (time.monotonic() - t0))):
            return
        if name == "postgres":
            cluster.stop("immediate")
            down = time.monotonic() - t0
            stop.wait(pg_down_s)
            cluster.start()
            faults.pg_outages.append((round(down, 1), round(time.monotonic() - t0 - down, 1)))
            continue
        proc = pipe.procs.get(name)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            faults.kills.append((round(time.monotonic() - t0, 1), name))


async def replay_deliveries(pipe: Pipeline, faults: Faults, *, rounds: int, every_s: float) -> None:
    """Re-produce the latest node results and decisions, in reverse order (duplicates that also
    arrive out of order)."""
    from aiokafka import TopicPartition

    from fedllm.common import topics
    from fedllm.common.kafka import make_consumer, make_producer

    for _ in range(rounds):
        await asyncio.sleep(every_s)
        consumer = make_consumer(pipe.settings, group_id=None)
        producer = make_producer(pipe.settings)
        try:
            await consumer.start()
            await producer.start()
            await consumer.topics()
            grabbed = []
            for topic in (topics.NODE_RESULTS, topics.DECISIONS):
                tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
                consumer.assign(tps)
                ends = await consumer.end_offsets(tps)
                for tp in tps:
                    consumer.seek(tp, max(0, ends[tp] - 5))
                todo = {tp for tp in tps if ends[tp] > 0}
                deadline = time.monotonic() + 5
                while todo and time.monotonic() < deadline:
                    for tp, msgs in (await consumer.getmany(timeout_ms=200)).items():
                        grabbed += [m for m in msgs if m.offset < ends[tp]]
                        if msgs and msgs[-1].offset >= ends[tp] - 1:
                            todo.discard(tp)
            for m in reversed(grabbed):
                await producer.send_and_wait(
                    m.topic, value=m.value, key=m.key, headers=list(m.headers or ())
                )
            faults.replayed += len(grabbed)
        except Exception as exc:  # the broker is never killed; anything else: note and go on
            print(f"replay round failed: {exc!r}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()


# -- invariants ---------------------------------------------------------------------------------


async def published_results(pipe: Pipeline) -> dict[str, dict]:
    """The first terminal result per request on fedllm.results (replays are identical)."""
    from aiokafka import TopicPartition

    from fedllm.common import codec, topics
    from fedllm.common.kafka import make_consumer

    consumer = make_consumer(pipe.settings, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [
            TopicPartition(topics.RESULTS, p)
            for p in consumer.partitions_for_topic(topics.RESULTS) or ()
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: dict[str, dict] = {}

        async def behind() -> bool:
            for tp in tps:
                if await consumer.position(tp) < ends[tp]:
                    return True
            return False

        while await behind():
            for msgs in (await consumer.getmany(timeout_ms=500)).values():
                for m in msgs:
                    rec = codec.decode_expect("InferenceResult", m.value, m.headers)
                    out.setdefault(rec["request_id"], rec)
        return out
    finally:
        await consumer.stop()


def fedllm_cli(pipe: Pipeline, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "fedllm.cli", *args],
        env=pipe.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def print_missing_terminal(pipe: Pipeline) -> None:
    """Diagnostics: the requests without a terminal audit record, their actions and ledger row."""
    from sqlalchemy import select

    from fedllm.common.db import make_engine
    from fedllm.services.accountant.tables import BudgetEntry
    from fedllm.services.auditor.compliance import TERMINAL_ACTIONS
    from fedllm.services.auditor.tables import audit_log

    engine = make_engine(pipe.database_url)
    try:
        with engine.connect() as conn:
            actions: dict[str, list[str]] = {}
            for rid, action in conn.execute(
                select(audit_log.c.request_id, audit_log.c.action).where(
                    audit_log.c.request_id != ""
                )
            ):
                actions.setdefault(rid, []).append(action)
            for rid, acts in actions.items():
                if not set(acts) & set(TERMINAL_ACTIONS):
                    entry = conn.execute(
                        select(BudgetEntry.state, BudgetEntry.outcome, BudgetEntry.reason).where(
                            BudgetEntry.request_id == rid
                        )
                    ).first()
                    print(f"no terminal audit record: {rid} {acts} ledger={entry}", file=sys.stderr)
    finally:
        engine.dispose()


def invariants(pipe: Pipeline, callers: list[Caller]) -> list[tuple[str, str, bool]]:
    from sqlalchemy import func, select

    from fedllm.common.db import make_engine
    from fedllm.privacy.accountant import RdpAccountant
    from fedllm.services.accountant.ledger import Ledger
    from fedllm.services.accountant.tables import BudgetAccount, BudgetEntry
    from fedllm.services.auditor.tables import audit_log

    rows: list[tuple[str, str, bool]] = []
    unread = [c for c in callers if not c.terminal]
    by_status: dict[str, int] = {}
    for c in callers:
        by_status[c.terminal or "none"] = by_status.get(c.terminal or "none", 0) + 1
    rows.append(
        (
            "every request: one terminal state its caller read",
            f"{len(callers) - len(unread)}/{len(callers)} "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())),
            not unread,
        )
    )
    engine = make_engine(pipe.database_url)
    try:
        with engine.connect() as conn:
            committed = conn.execute(
                select(func.coalesce(func.sum(BudgetEntry.spent_epsilon), 0.0)).where(
                    BudgetEntry.state == "committed"
                )
            ).scalar_one()
            audited = conn.execute(
                select(func.coalesce(func.sum(audit_log.c.epsilon), 0.0)).where(
                    audit_log.c.action == "budget.committed"
                )
            ).scalar_one()
            open_entries = conn.execute(
                select(func.count()).where(BudgetEntry.state == "reserved")
            ).scalar_one()
            accounts = conn.execute(
                select(
                    BudgetAccount.scope, BudgetAccount.charged_units, BudgetAccount.limit_epsilon
                )
            ).all()
        published = asyncio.run(published_results(pipe))
        reported = sum(float(r.get("privacy_cost") or 0.0) for r in published.values())
        ok = abs(committed - audited) < 1e-6 and abs(committed - reported) < 1e-6
        rows.append(
            (
                "ledger committed ε = Σ audit budget.committed ε = Σ published ε",
                f"{committed:.6f} / {audited:.6f} / {reported:.6f}",
                ok,
            )
        )
        ledger = Ledger(engine, pipe.settings.budget, RdpAccountant())
        over = [
            scope for scope, units, limit in accounts if ledger.filter.epsilon(units) > limit + 1e-9
        ]
        rows.append(
            ("no account over its limit", f"{len(accounts)} accounts, {len(over)} over", not over)
        )
        rows.append(("no reservation left open", f"{open_entries} open", open_entries == 0))
        read = {c.request_id for c in callers if c.request_id}
        mismatched = [
            c.request_id
            for c in callers
            if c.terminal == "ok" and published.get(c.request_id, {}).get("status") != "ok"
        ]
        rows.append(
            (
                "what callers read = the published terminal result",
                f"{len(read)} ids read, {len(mismatched)} mismatched",
                not mismatched,
            )
        )
    finally:
        engine.dispose()
    rc, out = fedllm_cli(pipe, "audit", "verify")
    rows.append(("`fedllm audit verify` passes", f"exit {rc}", rc == 0))
    rc, out = fedllm_cli(pipe, "compliance-check", "--report")
    if rc != 0:
        print_missing_terminal(pipe)
    terminal_line = next((ln for ln in out.splitlines() if "terminal record" in ln), out[-200:])
    rows.append(
        (
            "every received request has a terminal audit record",
            terminal_line.strip(),
            terminal_line.strip().startswith("PASS"),
        )
    )
    verdict = "COMPLIANT" if rc == 0 else "NOT COMPLIANT"
    rows.append(("`fedllm compliance-check` passes", verdict, rc == 0))
    return rows


# -- run ----------------------------------------------------------------------------------------

RECORDS_CACHE = Path(tempfile.gettempdir()) / "fedllm-chaos-records"


def _records_pairs(pipe: Pipeline) -> list[tuple[Path, Path]]:
    """(the hospital's clinosim folder in this run, its cached copy) per hospital: the synthetic
    records depend on (seed, population) only, and generating them costs minutes on a loaded
    machine; the node's privacy ledger is not cached (every run starts with a fresh budget)."""
    from fedllm.services.node_worker.answering import clinosim_dir

    return [
        (
            clinosim_dir(pipe.settings, h.id),
            RECORDS_CACHE / f"{h.id}-{h.seed}-{h.population}",
        )
        for h in pipe.settings.hospitals
    ]


def wait_all_running(pipe: Pipeline, *, timeout_s: float) -> None:
    """Until the supervisor reports every service running and ready (restarts done)."""
    from fedllm.launcher import status_path

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            status = json.loads(status_path(pipe.settings).read_text())
            if status and all(v["state"] == "running" and v["ready"] for v in status.values()):
                return
        time.sleep(0.5)
    raise TimeoutError(f"services not all back after {timeout_s} s")


def seed_records(pipe: Pipeline) -> None:
    for here, cached in _records_pairs(pipe):
        if cached.is_dir() and not here.exists():
            here.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(cached, here)


def keep_records(pipe: Pipeline) -> None:
    for here, cached in _records_pairs(pipe):
        if here.is_dir() and not cached.exists():
            tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
            shutil.copytree(here, tmp)
            with contextlib.suppress(OSError):
                tmp.rename(cached)
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Report:
    rows: list[tuple[str, str, bool]]
    faults: Faults
    seconds: dict[str, float]
    callers: list[Caller]

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.rows)

    def table(self) -> str:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'invariant'.ljust(w)}  held  measured", "-" * (w + 40)]
        lines += [
            f"{name.ljust(w)}  {'yes ' if ok else 'NO  '}  {got}" for name, got, ok in self.rows
        ]
        kinds: dict[str, int] = {}
        for _, name in self.faults.kills:
            kind = "node" if name.startswith("node-") else name
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append(
            f"faults: {len(self.faults.kills)} kill -9 ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
            f"Postgres down/up {self.faults.pg_outages} (at s, for s); "
            f"{self.faults.replayed} deliveries duplicated in reverse order; "
            f"{sum(c.resends for c in self.callers)} caller re-sends"
        )
        reasons: dict[str, int] = {}
        for c in self.callers:
            if c.terminal not in ("ok", ""):
                reasons[f"{c.terminal}: {c.reason}"] = (
                    reasons.get(f"{c.terminal}: {c.reason}", 0) + 1
                )
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n} × {reason}")
        lines.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def run(
    *,
    requests: int,
    kills: int,
    users: int = 6,
    concurrency: int = 8,
    pg_down_s: float = 3.0,
    load_window_s: float = 60.0,
    seed: int = 19,
    start_timeout_s: float = 240.0,
) -> Report:
    from tests.pg_cluster import Cluster

    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="fedllm-chaos-"))
    data_dir = scratch / "data"
    data_dir.mkdir()
    pg_root = Path(tempfile.mkdtemp(prefix="fedllm-chaos-pg-"))
    cluster = Cluster(pg_root).init()
    env = {
        "FEDLLM_REQUEST_TIMEOUT_S": "25",
        "FEDLLM_NODE_TIMEOUT_S": "10",
        "FEDLLM_NODE_TTL_S": "3",
        "FEDLLM_DP_GROUPS": "4",
        "FEDLLM_NODE_LOAD_MODEL": "false",
        # A run-only audit sealing key, so that `fedllm compliance-check` can pass as a whole.
        "FEDLLM_AUDIT_ENCRYPTION_KEY": base64.b64encode(
            os.urandom(32)
        ).decode(),  # aggregates only: no model to load on each restart
        "FEDLLM_DELIVERY_BACKOFF_MAX_S": "2",
        "FEDLLM_GATEWAY_CACHE__ENABLED": "false",
        "FEDLLM_GATEWAY_RATE_LIMIT_ADDRESS": "100000000",
        "FEDLLM_GATEWAY_RATE_LIMIT_USER": "100000000",
        "FEDLLM_GATEWAY_REDIS_PREFIX": f"fedllm:chaos:{uuid.uuid4().hex[:8]}",
        "REDIS_URL": os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
    }
    pipe = Pipeline(
        data_dir=data_dir,
        database_url=cluster.url,
        env=env,
        hospitals=[
            HospitalConfig(id="chaos_a", departments=[DEPARTMENT], seed=11),
            HospitalConfig(id="chaos_b", departments=[DEPARTMENT], seed=33),
        ],
    )
    pipe.bootstrap = ""  # a broker of its own, not a shared one
    seed_records(pipe)
    seconds: dict[str, float] = {}
    faults = Faults()
    stop = threading.Event()
    try:
        t = time.monotonic()
        pipe.start(timeout_s=start_timeout_s)
        seconds["start"] = time.monotonic() - t
        keep_records(pipe)
        supervisor = threading.Thread(
            target=pipe.supervise, args=(stop,), kwargs={"max_backoff_s": 2.0}, daemon=True
        )
        supervisor.start()
        schedule = kill_schedule(pipe, kills, load_window_s, rng)
        fault_thread = threading.Thread(
            target=run_faults,
            args=(pipe, cluster, schedule, 0.5 * load_window_s, pg_down_s, faults, stop),
            daemon=True,
        )
        t = time.monotonic()
        fault_thread.start()

        async def load_and_replay() -> list[Caller]:
            replay = asyncio.create_task(
                replay_deliveries(pipe, faults, rounds=3, every_s=load_window_s / 4)
            )
            callers = await load(
                pipe,
                requests,
                users=users,
                concurrency=concurrency,
                rng=rng,
                give_up_s=load_window_s + 120,
            )
            await replay
            return callers

        callers = asyncio.run(load_and_replay())
        fault_thread.join()
        seconds["load"] = time.monotonic() - t
        t = time.monotonic()
        # The supervisor keeps running to the end: the children it restarted die with its
        # thread (PR_SET_PDEATHSIG is per thread), so stopping it here would kill them.
        wait_all_running(pipe, timeout_s=120)
        drained = pipe.drain(timeout_s=90)
        seconds["drain"] = time.monotonic() - t
        t = time.monotonic()
        rows = invariants(pipe, callers)
        rows.insert(
            0, ("drained (ledger settled, audit caught up)", str(drained), all(drained.values()))
        )
        seconds["check"] = time.monotonic() - t
        return Report(rows, faults, seconds, callers)
    finally:
        stop.set()
        pipe.stop()
        with contextlib.suppress(Exception):
            cluster.stop("immediate")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="≤ 3 min: 60 requests, 6 kills")
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument("--kills", type=int, default=0)
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--window", type=float, default=0.0, help="seconds over which faults land")
    ap.add_argument("--seed", type=int, default=19)
    args = ap.parse_args()
    requests = args.requests or (60 if args.quick else 10_000)
    kills = args.kills or (6 if args.quick else 20)
    window = args.window or (40.0 if args.quick else max(60.0, requests / 20))
    report = run(
        requests=requests,
        kills=kills,
        users=args.users,
        concurrency=args.concurrency,
        load_window_s=window,
        seed=args.seed,
    )
    print(f"chaos: {requests} requests, {kills} kills over {window:.0f} s")
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: the DP answer cache on a Zipf-distributed stream of repeated questions.

Starts the whole pipeline (embedded broker unless KAFKA_BOOTSTRAP is set) with the gateway's
answer cache on the real Redis (REDIS_URL, default a scratch prefix on 127.0.0.1:6379/14),
replays a stream of questions drawn from a Zipf(s) law over a catalogue of distinct questions
(mostly DP aggregate queries, every `--text-every`-th one a free-text question), one request in
flight, and prints: hit ratio, ε spent and ε saved per department, and the latency of hits vs
misses. Baselines measured in the same run: a raw Redis GET round trip (the floor of a hit),
and the ε the same stream would have spent without the cache (every request a fresh release).

    python bench/cache.py --questions 300 --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from fedllm.launcher import Pipeline

DEPARTMENTS = ["cardiology", "emergency", "general", "radiology"]
HOSPITALS = ["st_mary", "city_general", "northside"]
TEXT = [
    "What is triage?",
    "What medications are given for chest pain?",
    "Which conditions are most common?",
    "What follow-up is advised after discharge?",
    "Summarise typical admissions.",
    "What are common causes of dyspnoea?",
    "How is hypertension usually managed?",
    "What does a nursing note record?",
    "Which tests are ordered for chest pain?",
    "What is sepsis?",
    "How are diabetic patients followed up?",
    "What is a SOAP note?",
    "Which symptoms lead to admission?",
    "How is pain assessed?",
    "What is a discharge summary?",
    "What are the signs of stroke?",
]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def catalogue(n: int, text_every: int) -> list[dict[str, Any]]:
    """n distinct questions (request bodies without department), in popularity order."""
    aggregates = []
    for lo in range(0, 100, 10):
        for hi in range(lo + 10, 110, 10):
            for sex in (None, "F", "M"):
                where: dict[str, Any] = {"age_min": lo, "age_max": hi}
                if sex:
                    where["sex"] = sex
                aggregates.append({"op": "count", "where": where})
    rng = random.Random(7)
    rng.shuffle(aggregates)
    out: list[dict[str, Any]] = []
    texts = iter(TEXT)
    for rank in range(n):
        text = next(texts, None) if text_every and rank % text_every == text_every // 2 else None
        if text is not None:
            out.append({"prompt": text, "kind": "generate", "max_tokens": 2, "privacy_budget": 1.0})
        else:
            query = aggregates[rank % len(aggregates)]
            out.append(
                {
                    "prompt": json.dumps(query),
                    "kind": "aggregate",
                    "max_tokens": 2,
                    "privacy_budget": 0.5,
                    "hospitals": [HOSPITALS[(rank // len(aggregates) + rank) % 3]],
                }
            )
    return out


def zipf_stream(n_questions: int, n_requests: int, s: float, seed: int) -> list[int]:
    weights = [1.0 / (r + 1) ** s for r in range(n_questions)]
    return random.Random(seed).choices(range(n_questions), weights=weights, k=n_requests)


async def raw_redis_gets(url: str, n: int) -> list[float]:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    key = f"fedllm:bench:raw:{uuid.uuid4().hex}"
    await client.set(key, b"x" * 400, px=60_000)
    try:
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            await client.get(key)
            lat.append((time.perf_counter() - t) * 1000)
        return lat
    finally:
        await client.delete(key)
        await client.aclose()


async def replay(
    pipeline: Pipeline, questions: list[dict[str, Any]], stream: list[int], seed: int
) -> list[dict[str, Any]]:
    from fedllm.services.gateway.tokens import mint_token

    rng = random.Random(seed)
    rows = []
    async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=300) as client:
        for i, q in enumerate(stream):
            dept = rng.choice(DEPARTMENTS)
            user = f"bench-{dept}-{i % 7}"
            token = mint_token(pipeline.settings, user_id=user, department=dept, role="doctor")
            body = {**questions[q], "temperature": 1.0, "department": dept}
            t = time.perf_counter()
            r = await client.post(
                "/v1/inference", json=body, headers={"Authorization": f"Bearer {token}"}
            )
            ms = (time.perf_counter() - t) * 1000
            out = r.json() if r.status_code == 200 else {}
            rows.append(
                {
                    "q": q,
                    "kind": body["kind"],
                    "dept": dept,
                    "ms": ms,
                    "status": r.status_code,
                    "cached": bool(out.get("cached")),
                    "cost": float(out.get("privacy_cost", 0.0)),
                    "saved": float((out.get("cached_release") or {}).get("privacy_cost", 0.0)),
                    "asked": body["privacy_budget"],
                }
            )
    return rows


def report(rows: list[dict[str, Any]], raw: list[float], args: argparse.Namespace) -> None:
    ok = [r for r in rows if r["status"] == 200]
    hits = [r for r in ok if r["cached"]]
    misses = [r for r in ok if not r["cached"]]
    print(
        f"stream: {len(rows)} requests over {args.questions} distinct questions "
        f"(Zipf s={args.zipf}; {len({r['q'] for r in rows})} distinct asked; "
        f"{sum(r['kind'] == 'generate' for r in rows)} text requests), 1 in flight; "
        f"failures {len(rows) - len(ok)} "
        f"{dict(collections.Counter(r['status'] for r in rows if r['status'] != 200))}"
    )
    print(
        f"hit ratio: {len(hits) / max(1, len(ok)):.3f} ({len(hits)} hits, "
        f"{len(misses)} fresh releases)"
    )
    print("epsilon per department (at delta 1e-5):")
    print(
        f"  {'department':<12} {'requests':>8} {'spent':>9} {'saved':>9} "
        f"{'no-cache':>9} {'saved %':>8}"
    )
    by: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in ok:
        by[r["dept"]].append(r)
    for dept in sorted(by):
        rs = by[dept]
        spent = sum(r["cost"] for r in rs)
        saved = sum(r["saved"] for r in rs)
        print(
            f"  {dept:<12} {len(rs):>8} {spent:>9.2f} {saved:>9.2f} {spent + saved:>9.2f} "
            f"{100 * saved / max(1e-9, spent + saved):>7.1f}%"
        )
    spent = sum(r["cost"] for r in ok)
    saved = sum(r["saved"] for r in ok)
    asked = sum(r["asked"] for r in ok)
    print(
        f"  {'all':<12} {len(ok):>8} {spent:>9.2f} {saved:>9.2f} {spent + saved:>9.2f} "
        f"{100 * saved / max(1e-9, spent + saved):>7.1f}%   (ε asked for by all requests: "
        f"{asked:.2f})"
    )
    print("latency, gateway round trip (ms):")
    print(f"  raw Redis GET (baseline)      p50 {pct(raw, 0.5):8.2f}  p95 {pct(raw, 0.95):8.2f}")
    for name, rs in (
        ("hits", hits),
        ("misses, aggregate", [r for r in misses if r["kind"] == "aggregate"]),
        ("misses, text", [r for r in misses if r["kind"] == "generate"]),
        ("hits, text", [r for r in hits if r["kind"] == "generate"]),
    ):
        ms = [r["ms"] for r in rs]
        if ms:
            print(
                f"  {name:<29} p50 {pct(ms, 0.5):8.2f}  p95 {pct(ms, 0.95):8.2f}  n={len(ms)}"
                f"  (p50 {pct(ms, 0.5) / pct(raw, 0.5):.0f}x raw)"
            )
    hit_p50 = pct([r["ms"] for r in hits], 0.5)
    agg_p50 = pct([r["ms"] for r in misses if r["kind"] == "aggregate"], 0.5)
    print(f"  aggregate miss / hit p50: {agg_p50 / hit_p50:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument(
        "--text-every",
        type=int,
        default=20,
        help="every k-th question by popularity is free text (0: none)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--groups", type=int, default=4, help="DP groups per node (text answers)")
    ap.add_argument("--data-dir", default=".fedllm")
    args = ap.parse_args()
    questions = catalogue(args.questions, args.text_every)
    stream = zipf_stream(args.questions, args.requests, args.zipf, args.seed)
    db = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    huge = "1000000"
    env = {
        "REDIS_URL": args.redis_url,
        "FEDLLM_GATEWAY_REDIS_PREFIX": f"fedllm:bench:{uuid.uuid4().hex[:8]}",
        "FEDLLM_GATEWAY_RATE_LIMIT_USER": huge,
        "FEDLLM_GATEWAY_RATE_LIMIT_ADDRESS": huge,
        "FEDLLM_BUDGET__USER_EPSILON": huge,
        "FEDLLM_BUDGET__DEPARTMENT_EPSILON": json.dumps(
            {d: float(huge) for d in [*DEPARTMENTS, "research"]}
        ),
        "FEDLLM_DP_GROUPS": str(args.groups),
    }
    with Pipeline(data_dir=Path(args.data_dir), database_url=db, env=env) as pipeline:
        raw = asyncio.run(raw_redis_gets(args.redis_url, 500))
        t0 = time.perf_counter()
        rows = asyncio.run(replay(pipeline, questions, stream, args.seed))
        wall = time.perf_counter() - t0
    print(
        f"broker: {'embedded Tansu' if pipeline.broker else pipeline.bootstrap}; "
        f"redis: {args.redis_url}; replay took {wall:.0f} s"
    )
    report(rows, raw, args)


if __name__ == "__main__":
    main()

"""Benchmark: requests/s and the time spent outside the model, through the running pipeline.

Starts the whole pipeline (embedded broker unless KAFKA_BOOTSTRAP is set), sends N requests
through the HTTP gateway with C in flight, and prints requests/s and p50/p95 of
(gateway round trip − the node's model time). The baseline, measured on the same broker in the
same run: a raw aiokafka produce→consume round trip. Note (see shared BROKER notes): the local
Tansu broker's fetch cost grows with stored batches, so figures are for fresh topics.

    python bench/pipeline.py --requests 40 --concurrency 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from fedllm.common.kafka import ensure_topics, make_consumer, make_producer
from fedllm.launcher import Pipeline


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def raw_round_trips(pipeline: Pipeline, n: int) -> tuple[list[float], float]:
    """Raw aiokafka: produce one message, consume it; per-message latency (ms) and msgs/s."""
    topic = f"bench.raw.{uuid.uuid4().hex[:8]}"
    await ensure_topics(pipeline.settings, {topic: 1})
    producer = make_producer(pipeline.settings)
    consumer = make_consumer(pipeline.settings, topic, group_id=f"bench-{uuid.uuid4().hex[:6]}")
    await producer.start()
    await consumer.start()
    try:
        await producer.send_and_wait(topic, b"warm-up")
        await consumer.getone()
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await producer.send_and_wait(topic, b"x" * 300)
            await consumer.getone()
            lat.append((time.perf_counter() - s) * 1000)
        return lat, n / (time.perf_counter() - t0)
    finally:
        await consumer.stop()
        await producer.stop()


def pipeline_requests(
    pipeline: Pipeline, n: int, concurrency: int, max_tokens: int
) -> tuple[list[float], list[float], float, int]:
    """(outside-model ms, model ms, requests/s, failures) through the HTTP gateway."""
    from fedllm.services.gateway.tokens import mint_token

    async def run() -> tuple[list[float], list[float], float, int]:
        sem = asyncio.Semaphore(concurrency)
        outside: list[float] = []
        model: list[float] = []
        failures = 0
        async with httpx.AsyncClient(base_url=pipeline.gateway_url, timeout=300) as client:

            async def one(i: int) -> None:
                nonlocal failures
                user = f"bench-{i}"
                token = mint_token(
                    pipeline.settings, user_id=user, department="emergency", role="doctor"
                )
                body = {
                    "prompt": "What is triage?",
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "privacy_budget": 0.5,
                    "department": "emergency",
                }
                async with sem:
                    s = time.perf_counter()
                    r = await client.post(
                        "/v1/inference", json=body, headers={"Authorization": f"Bearer {token}"}
                    )
                    total = (time.perf_counter() - s) * 1000
                if r.status_code != 200:
                    failures += 1
                    return
                m = float(r.json().get("model_time", 0.0))
                model.append(m)
                outside.append(total - m)

            await one(-1)  # warm-up (model caches, first fetches)
            outside.clear()
            model.clear()
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return outside, model, n / (time.perf_counter() - t0), failures

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--raw", type=int, default=300, help="raw round trips for the baseline")
    ap.add_argument(
        "--groups",
        type=int,
        default=4,
        help="DP groups per node (model time only; not what is measured here)",
    )
    ap.add_argument("--data-dir", default=".fedllm")
    args = ap.parse_args()
    db = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.db'}"
    with Pipeline(
        data_dir=Path(args.data_dir),
        database_url=db,
        env={"FEDLLM_GATEWAY_RATE_LIMIT_ADDRESS": "1000000", "FEDLLM_DP_GROUPS": str(args.groups)},
    ) as pipeline:
        raw, raw_rate = asyncio.run(raw_round_trips(pipeline, args.raw))
        outside, model, rate, failures = pipeline_requests(
            pipeline, args.requests, args.concurrency, args.max_tokens
        )
    print(f"broker: {'embedded Tansu' if pipeline.broker else pipeline.bootstrap}")
    print(
        f"raw aiokafka produce→consume (1 in flight, {args.raw} msgs): "
        f"p50 {pct(raw, 0.5):.2f} ms  p95 {pct(raw, 0.95):.2f} ms  {raw_rate:.0f} msg/s"
    )
    if not outside:
        print(f"pipeline: all {failures} requests failed")
        return
    print(
        f"pipeline ({args.requests} requests, {args.concurrency} in flight, "
        f"max_tokens {args.max_tokens}): {rate:.2f} req/s, failures {failures}"
    )
    print(f"  model time            p50 {pct(model, 0.5):.1f} ms  p95 {pct(model, 0.95):.1f} ms")
    print(
        f"  outside the model     p50 {pct(outside, 0.5):.1f} ms  p95 {pct(outside, 0.95):.1f} ms"
        f"  mean {statistics.fmean(outside):.1f} ms"
    )
    print(
        f"  ratio outside-model / raw round trip: p50 {pct(outside, 0.5) / pct(raw, 0.5):.1f}x"
        f"  p95 {pct(outside, 0.95) / pct(raw, 0.95):.1f}x"
    )


if __name__ == "__main__":
    main()

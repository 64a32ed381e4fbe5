"""Audit events/s stored in Postgres: the auditor's insert path beside a raw batched INSERT.

The auditor path is what the service does per batch: AuditEvent → row (clear-text scrub), lock
the chain head, look up event ids, hash-chain, executemany INSERT, update the head, commit.
The raw path inserts the very same rows (hashes precomputed) with psycopg `executemany` into a
copy of the table (`LIKE audit_log INCLUDING ALL`, so same indexes), one commit per batch.

    python bench/auditor.py [--events 20000] [--batch 500] [--admin-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from typing import Any

import psycopg
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from fedllm.common.audit import audit_event
from fedllm.common.db import make_engine, normalise_url
from fedllm.services.auditor.migrate import upgrade
from fedllm.services.auditor.rows import Protection, event_to_row
from fedllm.services.auditor.store import append
from fedllm.services.auditor.tables import audit_log

COLUMNS = [c.name for c in audit_log.columns if c.name not in ("id", "stored_at")]


def events(n: int, tag: str) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        out.append(
            audit_event(
                action=["request.received", "budget.committed", "request.completed"][i % 3],
                service="accountant",
                id_parts=(tag, i),
                request_id=f"req-{i // 3}",
                user_id=f"user-{i % 50}",
                role="clinician",
                department="cardiology",
                source_address="10.1.2.3",
                hospital_id="st_mary",
                records_used=12,
                outcome="ok",
                epsilon=0.25,
                delta=1e-5,
                rdp_summary='{"orders":[2,4,8],"rdp":[0.1,0.2,0.4]}',
                prompt_hmac="ab" * 32,
                strategy="least_load",
                latency_ms="41",
            )
        )
    return out


def bench_auditor(url: str, evs: list[dict[str, Any]], batch: int) -> float:
    engine = make_engine(url)
    upgrade(engine)
    prot = Protection(hmac_key=b"bench", sealer=None)
    t0 = time.perf_counter()
    for i in range(0, len(evs), batch):
        append(engine, [event_to_row(e, prot) for e in evs[i : i + batch]])
    dt = time.perf_counter() - t0
    engine.dispose()
    return len(evs) / dt


def bench_raw(url: str, batch: int) -> float:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = [
            tuple(json.dumps(r[c]) if c == "details" else r[c] for c in COLUMNS)
            for r in conn.execute(select(audit_log).order_by(audit_log.c.seq)).mappings()
        ]
    engine.dispose()
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    sql = (
        f"INSERT INTO audit_raw ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    )
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE audit_raw (LIKE audit_log INCLUDING ALL)")
        conn.commit()
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            with conn.cursor() as cur:
                cur.executemany(sql, rows[i : i + batch])
            conn.commit()
        dt = time.perf_counter() - t0
    return len(rows) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--admin-url",
        default=os.environ.get(
            "DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = ap.parse_args()
    admin = create_engine(normalise_url(args.admin_url), isolation_level="AUTOCOMMIT")
    ours, raws = [], []
    for r in range(args.repeats):
        name = f"fedllm_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = (
            make_url(normalise_url(args.admin_url))
            .set(database=name)
            .render_as_string(hide_password=False)
        )
        try:
            evs = events(args.events, name)
            ours.append(bench_auditor(url, evs, args.batch))
            raws.append(bench_raw(url, args.batch))
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        print(f"run {r + 1}: auditor {ours[-1]:,.0f} ev/s, raw executemany {raws[-1]:,.0f} ev/s")
    a, b = statistics.median(ours), statistics.median(raws)
    print(f"{args.events} events, batches of {args.batch}, median of {args.repeats} runs")
    print(f"auditor insert path (chain + dedupe + head lock): {a:,.0f} events/s")
    print(f"raw batched INSERT (psycopg executemany):         {b:,.0f} events/s")
    print(f"ratio auditor/raw: {a / b:.2f}")


if __name__ == "__main__":
    main()

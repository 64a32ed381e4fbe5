"""Postgres goes away under a steady stream of audit events: the auditor waits and retries;
once Postgres is back nothing is lost and nothing is stored twice.

Uses its own throw-away cluster (initdb/pg_ctl in a tmp dir on a free port). The outage lasts
FEDLLM_TEST_PG_DOWN_S seconds (default 30, as the issue asks).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fedllm.common.db import make_engine
from fedllm.services.auditor.tables import audit_log
from fedllm.services.auditor.verify import verify
from tests.auditor.test_service import (  # noqa: F401
    Running,
    bus,
    emit_many,
    make_settings,
    namespace,
)
from tests.pg_cluster import PG_BIN, Cluster

DOWN_S = float(os.environ.get("FEDLLM_TEST_PG_DOWN_S", "30"))

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session")]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no initdb under {PG_BIN}")
    # Not under pytest's tmp dir: the postgres user must be able to reach it when we are root.
    root = Path(tempfile.mkdtemp(prefix="fedllm-pgfault-"))
    try:
        c = Cluster(root).init()
        yield c
        try:
            c.stop("immediate")
        except RuntimeError:
            pass
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_outage_loses_and_duplicates_nothing(
    bus,  # noqa: F811
    namespace: str,  # noqa: F811
    kafka_bootstrap: str,
    cluster: Cluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(kafka_bootstrap, cluster.url, tmp_path, namespace)
    engine = make_engine(cluster.url)
    tag = f"fault-{uuid.uuid4().hex[:8]}"
    sent = 0
    stop_sending = asyncio.Event()

    async def steady_stream() -> None:
        nonlocal sent
        while not stop_sending.is_set():
            await emit_many(bus, tag, 5, start=sent)
            sent += 5
            await asyncio.sleep(0.05)  # ~100 events/s

    caplog.set_level(logging.WARNING, logger="fedllm.services.auditor.service")
    async with Running(settings, f"auditor-fault-{uuid.uuid4().hex[:8]}") as auditor:
        producer = asyncio.create_task(steady_stream())
        await asyncio.sleep(3)
        await asyncio.to_thread(cluster.stop, "fast")
        down_at, sent_at_stop = time.monotonic(), sent
        await asyncio.sleep(DOWN_S)
        assert auditor.task is not None and not auditor.task.done(), "auditor gave up"
        await asyncio.to_thread(cluster.start)
        assert sent > sent_at_stop + 10, "events kept flowing during the outage"
        await asyncio.sleep(3)
        stop_sending.set()
        await producer
        deadline = time.monotonic() + 60
        while True:
            try:
                with engine.connect() as conn:  # only this test's events
                    stored = conn.scalar(
                        select(func.count())
                        .select_from(audit_log)
                        .where(audit_log.c.request_id.like(f"{tag}-%"))
                    )
            except Exception:
                stored = -1
            if stored == sent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    outage = time.monotonic() - down_at
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert retries, "the auditor should have retried while Postgres was down"
    with engine.connect() as conn:
        ids = list(
            conn.scalars(
                select(audit_log.c.request_id).where(audit_log.c.request_id.like(f"{tag}-%"))
            )
        )
        seqs = list(conn.scalars(select(audit_log.c.seq).order_by(audit_log.c.seq)))
    assert sorted(ids) == sorted(f"{tag}-{i}" for i in range(sent)), "lost or duplicated"
    assert seqs == list(range(1, len(seqs) + 1))  # contiguous, other events included
    assert verify(engine).ok
    print(
        f"{sent} events, Postgres down {DOWN_S:.0f} s (outage window {outage:.0f} s), "
        f"{len(retries)} retries, all stored once"
    )

"""Chaos under load (issue 19, item 9): the whole pipeline as real processes (its own embedded
broker, a scratch Postgres cluster on another port, two hospitals with the real node worker in
its aggregate-only mode, `FEDLLM_NODE_LOAD_MODEL=false`), DP aggregate queries only (generate is
skipped: model loads and generation on this CPU do not fit the bound), while each service
kind is killed with SIGKILL at random instants (the `fedllm up` supervisor loop restarts it),
Postgres is stopped and started, and node results and decisions are re-delivered duplicated and
in reverse order. The invariants are those of `bench/chaos.py`, which runs the same at scale.

Bounded: 40 requests, 6 kills over 40 s; ≤ 3 minutes.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest

from bench.chaos import run
from tests.pg_cluster import PG_BIN

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _redis_up() -> bool:
    """The gateway's result store must survive a gateway kill: Redis (REDIS_URL or local)."""
    url = urlparse(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    try:
        socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), 2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not (PG_BIN / "initdb").exists(), reason=f"no initdb under {PG_BIN}")
@pytest.mark.skipif(not _redis_up(), reason="no Redis for the gateway result store")
def test_every_request_ends_once_and_is_charged_once_under_kills_outages_and_replays() -> None:
    report = run(
        requests=int(os.environ.get("FEDLLM_CHAOS_REQUESTS", "40")),
        kills=6,
        load_window_s=40.0,
        seed=int(os.environ.get("FEDLLM_CHAOS_SEED", "19")),
    )
    print(report.table())
    kinds = {"node" if n.startswith("node-") else n for _, n in report.faults.kills}
    assert kinds == {"accountant", "router", "gateway", "auditor", "node"}, report.faults.kills
    assert report.faults.pg_outages, "Postgres was not taken down"
    assert report.faults.replayed > 0, "no delivery was duplicated"
    failed = [(name, got) for name, got, ok in report.rows if not ok]
    assert not failed, report.table()

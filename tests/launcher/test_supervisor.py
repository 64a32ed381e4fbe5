"""`fedllm up` as a supervisor, run as a real process tree (embedded broker, SQLite ledger, one
hospital whose model need not finish loading): a killed service is restarted and reported in /v1/health; a
signal drains and stops every child — no orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedllm.embedded import free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid` (by parent pid, across sessions)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(check, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_up_restarts_a_crashed_service_and_a_signal_stops_every_child(
    tmp_path: Path, sig: int
) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP", "DATABASE_URL", "REDIS_URL")
    }
    env.update(FEDLLM_HOSPITALS='[{"id": "h1", "departments": ["cardiology"]}]', FEDLLM_MODE="demo")
    up = subprocess.Popen(
        [sys.executable, "-m", "fedllm", "up", "--data-dir", str(tmp_path), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    status = tmp_path / "run" / "services.json"
    try:

        def running() -> dict | None:
            try:
                s = json.loads(status.read_text())
            except (OSError, ValueError):
                return None
            # The node's model may take minutes to load on a busy machine: not waited for.
            ok = s and all(v["ready"] for k, v in s.items() if not k.startswith("node-"))
            return s if ok and len(s) == 5 else None

        before = _wait_for(running, 240, "every service running")
        router_pid = before["router"]["pid"]
        os.kill(router_pid, signal.SIGKILL)

        def restarted() -> dict | None:
            h = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()
            r = (h.get("services") or {}).get("router", {})
            return (
                h
                if r.get("restarts", 0) >= 1 and r.get("pid") != router_pid and r.get("ready")
                else None
            )

        health = _wait_for(restarted, 60, "the router restarted and reported in /v1/health")
        assert health["services"]["router"]["last_exit"] == -signal.SIGKILL
        assert _alive(health["services"]["router"]["pid"])

        children = _children(up.pid)
        assert len(children) >= 6  # broker, auditor, accountant, router, gateway, node-h1
        up.send_signal(sig)
        out, _ = up.communicate(timeout=120)
        assert up.returncode == 0, out.decode(errors="replace")[-2000:]
        assert b"drained: {'ledger': True, 'audit': True}" in out
        left = [p for p in children if _alive(p)]
        assert left == [], f"orphans left: {left}"
    finally:
        # Only this test's `fedllm up` and its children: never the session's own broker or
        # the other fixtures' processes (children of pytest too).
        mine = _children(up.pid) if up.poll() is None else []
        if up.poll() is None:
            up.kill()
            up.wait()
        for p in mine:
            if _alive(p):
                os.kill(p, signal.SIGKILL)

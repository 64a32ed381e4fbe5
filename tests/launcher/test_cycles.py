"""`fedllm compliance-check` passes after start / load / stop cycles of `fedllm up` (issue 19,
item 7): each stop (SIGTERM) comes with requests still in flight, and the drain must close them
all and store every audit event before the broker (which keeps nothing) goes away. Real process
tree, embedded broker, SQLite ledger and audit log kept across the cycles in one data dir."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fedllm.embedded import free_port
from tests.launcher.test_supervisor import _alive, _children, _wait_for

pytestmark = pytest.mark.slow

CYCLES = 2
PER_CYCLE = 8


def _env(tmp_path: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP", "DATABASE_URL", "REDIS_URL")
    }
    env.update(
        FEDLLM_HOSPITALS='[{"id": "h1", "departments": ["cardiology"]}]',
        FEDLLM_MODE="demo",
        FEDLLM_DATA_DIR=str(tmp_path),
        FEDLLM_REQUEST_TIMEOUT_S="20",
        FEDLLM_NODE_TIMEOUT_S="8",
        FEDLLM_AUDIT_ENCRYPTION_KEY=base64.b64encode(b"c" * 32).decode(),
    )
    return env


def _load(port: int, token: str, sent: list[int]) -> list[threading.Thread]:
    """Fire PER_CYCLE aggregate requests without waiting for their answers."""

    def one() -> None:
        body = {
            "prompt": json.dumps({"op": "count"}),
            "kind": "aggregate",
            "max_tokens": 1,
            "temperature": 0.0,
            "privacy_budget": 0.1,
            "department": "cardiology",
        }
        try:
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/inference",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            sent.append(r.status_code)
        except httpx.HTTPError:
            sent.append(0)  # the gateway closed under us: the drain still owes it an ending

    threads = [threading.Thread(target=one, daemon=True) for _ in range(PER_CYCLE)]
    for t in threads:
        t.start()
    return threads


def test_compliance_check_passes_after_start_load_stop_cycles(tmp_path: Path) -> None:
    from fedllm.common.config import Settings
    from fedllm.services.gateway.tokens import mint_token

    env = _env(tmp_path)
    token = mint_token(
        Settings(mode="demo", jwt_secret=""),
        user_id="cycler",
        department="cardiology",
        role="doctor",
    )
    sent: list[int] = []
    for _ in range(CYCLES):
        port = free_port()
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedllm",
                "up",
                "--data-dir",
                str(tmp_path),
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:

            def serving() -> bool:
                try:
                    s = json.loads((tmp_path / "run" / "services.json").read_text())
                except (OSError, ValueError):
                    return False
                return all(v["ready"] for k, v in s.items() if not k.startswith("node-"))

            _wait_for(serving, 240, "every service but the node running")
            before = len(sent)
            threads = _load(port, token, sent)
            time.sleep(1.0)  # requests in flight when the stop comes
            up.send_signal(signal.SIGTERM)
            out, _ = up.communicate(timeout=180)
            for t in threads:
                t.join(timeout=60)
            assert up.returncode == 0, out.decode(errors="replace")[-2000:]
            assert b"drained: {'ledger': True, 'audit': True}" in out, out[-2000:]
            assert len(sent) - before == PER_CYCLE
        finally:
            mine = _children(up.pid) if up.poll() is None else []
            if up.poll() is None:
                up.kill()
                up.wait()
            for p in mine:
                if _alive(p):
                    os.kill(p, signal.SIGKILL)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedllm.cli",
            "compliance-check",
            "--report",
            "--database-url",
            f"sqlite:///{tmp_path / 'fedllm.db'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "terminal record per request" in ln)
    requests = int(line.split("terminal record per request:")[1].split("requests")[0])
    assert requests >= sum(1 for s in sent if s), line
    assert " 0 missing" in line, line

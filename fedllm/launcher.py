"""Runs the whole pipeline on one machine: `fedllm topics`, `fedllm up`, `fedllm demo`.

The embedded default starts the bundled Tansu broker on a free loopback port and a SQLite
ledger; KAFKA_BOOTSTRAP / DATABASE_URL / REDIS_URL, when set, replace the embedded parts.
Every service runs as its own process (`fedllm <service>`), exactly as in a deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedllm.common import topics
from fedllm.common.config import (
    DEMO_JWT_SECRET,
    POPULATION_PRESETS,
    HospitalConfig,
    Settings,
    default_hospitals,
)
from fedllm.common.kafka import ensure_topics, wait_for_broker
from fedllm.common.lifecycle import ready_path
from fedllm.embedded import EmbeddedBroker, free_port


class Pipeline:
    """The broker (embedded unless KAFKA_BOOTSTRAP is set) plus one process per service."""

    def __init__(
        self,
        *,
        data_dir: Path,
        env: dict[str, str] | None = None,
        database_url: str | None = None,
        gateway_port: int | None = None,
        hospitals: list[HospitalConfig] | None = None,
        kafka_port: int | None = None,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.kafka_port = kafka_port
        self.extra_env = dict(env or {})
        self.hospitals = hospitals
        self.database_url = database_url or os.environ.get("DATABASE_URL", "")
        self.gateway_port = gateway_port or free_port()
        self.broker: EmbeddedBroker | None = None
        self.bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.settings = Settings(kafka_bootstrap=self.bootstrap, **self._settings_overrides())

    def _settings_overrides(self) -> dict[str, Any]:
        env = self.env()
        overrides: dict[str, Any] = {
            "data_dir": self.data_dir,
            "mode": env["FEDLLM_MODE"],
            "jwt_secret": env.get("JWT_SECRET", ""),
            "topic_namespace": env.get("FEDLLM_TOPIC_NAMESPACE", ""),
        }
        if self.hospitals is not None:
            overrides["hospitals"] = self.hospitals
        return overrides

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP=self.bootstrap,
            FEDLLM_DATA_DIR=str(self.data_dir),
            FEDLLM_GATEWAY_PORT=str(self.gateway_port),
        )
        env.setdefault("FEDLLM_MODE", "demo")
        env.setdefault("FEDLLM_TORCH_THREADS", "1")  # several nodes share this machine's cores
        if env["FEDLLM_MODE"] == "demo":
            env.setdefault("JWT_SECRET", DEMO_JWT_SECRET)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.hospitals is not None:
            env["FEDLLM_HOSPITALS"] = json.dumps([h.model_dump() for h in self.hospitals])
        env.update(self.extra_env)
        return env

    def start_broker(self) -> None:
        if not self.bootstrap:
            (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.broker = EmbeddedBroker(
                port=self.kafka_port, log_path=self.data_dir / "logs" / "broker.log"
            ).start()
            self.bootstrap = self.broker.bootstrap
        self.settings = Settings(kafka_bootstrap=self.bootstrap, **self._settings_overrides())
        asyncio.run(create_topics(self.settings))

    def service_commands(self) -> dict[str, list[str]]:
        """Process name -> `fedllm` arguments, for every service of the pipeline."""
        cmds = {
            "auditor": ["auditor"],
            "accountant": ["accountant"],
            "router": ["router"],
            "gateway": ["gateway"],
        }
        for h in self.settings.hospitals:
            cmds[f"node-{h.id}"] = ["node", "--hospital", h.id]
        return cmds

    def start_service(self, name: str, args: list[str]) -> None:
        ready_path(self.settings, name).unlink(missing_ok=True)
        log_dir = self.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fedllm.cli", *args],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def launch(self) -> Pipeline:
        """Start the broker, create topics and start every service (without waiting)."""
        if self.database_url == "" and "DATABASE_URL" not in self.extra_env:
            self.database_url = f"sqlite:///{self.data_dir / 'fedllm.db'}"
        self.start_broker()
        for name, args in self.service_commands().items():
            self.start_service(name, args)
        return self

    def start(self, timeout_s: float = 300.0) -> Pipeline:
        """`launch`, then wait until every service is ready and every node routable."""
        launched_ms = int(time.time() * 1000)
        self.launch()
        self.wait_ready(list(self.procs), timeout_s=timeout_s)
        hospitals = [h.id for h in self.settings.hospitals]
        asyncio.run(nodes_routable(self.settings, hospitals, since_ms=launched_ms))
        return self

    def wait_ready(self, names: list[str], *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending:
            for name in list(pending):
                proc = self.procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"service {name} exited with {proc.returncode}; "
                        f"see {self.data_dir / 'logs' / (name + '.log')}"
                    )
                if ready_path(self.settings, name).exists():
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"services not ready after {timeout_s}s: {sorted(pending)}")
            time.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one service process (fault injection in tests)."""
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
        ready_path(self.settings, name).unlink(missing_ok=True)

    def stop_services(self, names: list[str], *, timeout_s: float = 15.0) -> None:
        """SIGTERM each named service's process group, SIGKILL what is left after timeout_s."""
        procs = [self.procs[n] for n in names if n in self.procs]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        self.stop_services(list(self.procs))
        if self.broker:
            self.broker.stop()

    def drain(self, *, timeout_s: float) -> dict[str, bool]:
        """Stop taking work and let what is in flight finish: the gateway stops (uvicorn lets
        open requests complete), the ledger's reservations reach a terminal state and the
        outbox empties, and the auditor stores every audit event. Returns what completed."""
        deadline = time.monotonic() + timeout_s
        self.stop_services(["gateway"], timeout_s=timeout_s)
        done = {"ledger": _wait(lambda: _ledger_settled(self.settings), deadline)}
        done["audit"] = _wait(
            lambda: asyncio.run(_audit_caught_up(self.settings)), deadline, stable_for_s=1.0
        )
        return done

    def supervise(
        self,
        stop: threading.Event,
        *,
        max_backoff_s: float = 30.0,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Until `stop` is set: restart a service that exited, with exponential backoff per
        service (1 s, 2 s, … max_backoff_s), and keep `<data_dir>/run/services.json` current
        (the gateway's /v1/health reports it); `on_ready()` once every service is first ready."""
        commands = self.service_commands()
        restarts = dict.fromkeys(self.procs, 0)
        due: dict[str, float] = {}
        last_exit: dict[str, int] = {}
        while not stop.is_set():
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                if name in due:
                    if now >= due[name] and name in commands:
                        del due[name]
                        restarts[name] = restarts.get(name, 0) + 1
                        self.start_service(name, commands[name])
                elif proc.poll() is not None:
                    last_exit[name] = proc.returncode
                    due[name] = now + min(2.0 ** restarts.get(name, 0), max_backoff_s)
            status = {
                name: {
                    "pid": proc.pid,
                    "state": "restarting" if name in due else "running",
                    "ready": name not in due and ready_path(self.settings, name).exists(),
                    "restarts": restarts.get(name, 0),
                    "last_exit": last_exit.get(name),
                }
                for name, proc in self.procs.items()
            }
            write_status(self.settings, status)
            if on_ready is not None and all(v["ready"] for v in status.values()):
                on_ready()
                on_ready = None
            stop.wait(0.2)

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def create_topics(settings: Settings) -> None:
    """Wait for the broker, then create every topic the configured hospitals need."""
    await wait_for_broker(settings)
    await ensure_topics(settings, topics.all_topics([h.id for h in settings.hospitals]))


def _topics(args: argparse.Namespace) -> int:
    asyncio.run(create_topics(Settings()))
    print("topics ready")
    return 0


def preset_hospitals(preset: str) -> list[HospitalConfig] | None:
    """The default hospitals at a population preset, or ``None`` when hospitals are configured
    explicitly (FEDLLM_HOSPITALS or a FEDLLM_CONFIG file), which then win."""
    if os.environ.get("FEDLLM_HOSPITALS") or os.environ.get("FEDLLM_CONFIG"):
        return None
    pop = POPULATION_PRESETS[preset]
    return [h.model_copy(update={"population": pop}) for h in default_hospitals()]


def generate_hospitals(settings: Settings) -> None:
    """Generate every configured hospital's records before the nodes start (once; cached),
    with a progress bar and a time estimate, so no node waits on clinosim."""
    from fedllm.services.node_worker.answering import clinosim_dir
    from fedllm.services.node_worker.clinosim_data import ensure_clinosim

    for h in settings.hospitals:
        ensure_clinosim(
            clinosim_dir(settings, h.id), seed=h.seed, population=h.population, progress=True
        )


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the supervisor dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def status_path(settings: Settings) -> Path:
    return settings.data_dir / "run" / "services.json"


def write_status(settings: Settings, status: Mapping[str, Mapping[str, object]]) -> None:
    path = status_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, sort_keys=True))
    tmp.replace(path)


def _wait(check: Callable[[], bool], deadline: float, *, stable_for_s: float = 0.0) -> bool:
    """Poll `check` until it has held for `stable_for_s` or `deadline` passes."""
    held_since: float | None = None
    while time.monotonic() < deadline:
        try:
            ok = check()
        except Exception:
            ok = False
        if ok:
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= stable_for_s:
                return True
        else:
            held_since = None
        time.sleep(0.2)
    return False


def _ledger_settled(settings: Settings) -> bool:
    """No reservation still open and no outbox message unsent."""
    from sqlalchemy import inspect, text

    from fedllm.common.db import make_engine

    engine = make_engine(settings.resolved_database_url())
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            open_ = (
                conn.execute(
                    text("SELECT count(*) FROM budget_entries WHERE state = 'reserved'")
                ).scalar()
                if "budget_entries" in tables
                else 0
            )
            unsent = (
                conn.execute(
                    text("SELECT count(*) FROM outbox_messages WHERE sent_at_ms IS NULL")
                ).scalar()
                if "outbox_messages" in tables
                else 0
            )
        return open_ == 0 and unsent == 0
    finally:
        engine.dispose()


async def nodes_routable(
    settings: Settings, hospital_ids: list[str], *, since_ms: int, timeout_s: float = 60.0
) -> None:
    """Wait until each node has announced itself healthy on the heartbeat topic (a heartbeat
    sent at or after `since_ms`), then for the router and the gateway, which read heartbeats
    with the background fetch wait, to have read it too. A node marks itself ready once it is
    healthy, but the router learns that only from its next heartbeat: without this wait a
    request sent the moment every service is ready could find no node to route to."""
    from fedllm.common import codec
    from fedllm.common.kafka import assign_all, make_consumer, seek_all
    from fedllm.schemas.records import NodeHeartbeat

    pending = set(hospital_ids)
    consumer = make_consumer(settings, group_id=None)
    await consumer.start()
    try:
        tps = await assign_all(consumer, topics.scoped(settings, topics.HEARTBEATS), wait_s=10.0)
        await seek_all(consumer, tps, to_end=False)
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy heartbeat from {sorted(pending)} in {timeout_s}s")
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    with contextlib.suppress(codec.DecodeError):
                        hb = codec.decode_as(NodeHeartbeat, m.value, m.headers)
                        if hb["healthy"] and hb["sent_at_ms"] >= since_ms:
                            pending.discard(hb["hospital_id"])
    finally:
        await consumer.stop()
    await asyncio.sleep(2 * settings.background_fetch_max_wait_ms / 1000)


async def _audit_caught_up(settings: Settings) -> bool:
    """The auditor's committed offsets have reached the end of the audit topic."""

    from fedllm.common.kafka import make_consumer, partitions_of
    from fedllm.services.auditor.settings import AuditorSettings

    consumer = make_consumer(settings, group_id=AuditorSettings().group_id)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topics.scoped(settings, topics.AUDIT), missing_ok=True)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if (await consumer.committed(tp) or 0) < ends[tp]:
                return False
        return True
    finally:
        await consumer.stop()


def _up(args: argparse.Namespace) -> int:
    """Supervise the pipeline until SIGTERM, SIGINT or SIGHUP; then drain and stop it all."""
    hospitals = preset_hospitals(args.preset)
    pipeline = Pipeline(
        data_dir=Path(args.data_dir),
        gateway_port=args.port,
        kafka_port=args.kafka_port or None,
        hospitals=hospitals,
    )
    generate_hospitals(pipeline.settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        pipeline.launch()
        pipeline.supervise(
            stop,
            on_ready=lambda: print(
                f"fedllm is up: gateway {pipeline.gateway_url} (docs at /docs), "
                f"broker {pipeline.bootstrap}. Ctrl-C to stop.",
                flush=True,
            ),
        )
        print("draining…", flush=True)
        done = pipeline.drain(timeout_s=pipeline.settings.request_timeout_s + 30)
        print(f"drained: {done}", flush=True)
    finally:
        pipeline.stop()
        status_path(pipeline.settings).unlink(missing_ok=True)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedllm.demo import run_demo

    return run_demo(data_dir=Path(args.data_dir))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="create every topic with its partition count")
    p.set_defaults(func=_topics)
    p = sub.add_parser("up", help="run the whole pipeline locally until Ctrl-C")
    p.add_argument("--data-dir", default=".fedllm")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--kafka-port",
        type=int,
        default=19092,
        help="port of the embedded broker, for Kafka clients (0: any free port)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(POPULATION_PRESETS),
        default="realistic",
        help="hospital size (generated once, cached): clinosim population "
        + ", ".join(f"{k}={v}" for k, v in POPULATION_PRESETS.items()),
    )
    p.set_defaults(func=_up)
    p = sub.add_parser("demo", help="run the pipeline, send scripted requests, print a table")
    p.add_argument("--data-dir", default=".fedllm")
    p.set_defaults(func=_demo)

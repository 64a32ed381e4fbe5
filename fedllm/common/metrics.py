"""Prometheus metrics every service shares, and the /metrics + /healthz + /readyz server.

Label values are bounded: service and stage names are code constants, topics are the fixed
pipeline topics, hospitals and departments come from the configuration (anything else is
reported as ``other``). No user id, request id or free text ever becomes a label.
Dashboards (compose/grafana/dashboards) and alert rules (compose/prometheus/alerts.yml) name
only metrics defined here or in services/gateway/metrics.py; tests/ops/test_observability.py
checks that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fedllm.common import logs, tracing
from fedllm.common.config import Settings

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

MESSAGES = Counter("fedllm_messages_total", "Messages handled", ["service", "topic", "outcome"])
STAGE_REQUESTS = Counter(
    "fedllm_stage_requests_total",
    "Messages processed per pipeline stage, by outcome (ok or error).",
    ["service", "stage", "outcome"],
)
STAGE_LATENCY = Histogram(
    "fedllm_stage_duration_seconds",
    "Time a pipeline stage spent on one message.",
    ["service", "stage"],
    buckets=LATENCY_BUCKETS,
)
DLQ = Counter(
    "fedllm_dlq_messages_total",
    "Messages sent to a dead-letter topic, by service and origin topic.",
    ["service", "topic"],
)
CONSUMER_LAG = Gauge(
    "fedllm_consumer_lag_messages",
    "Records behind the partition's high watermark after the last fetch.",
    ["service", "topic", "partition"],
)
NODE_QUEUE_DEPTH = Gauge(
    "fedllm_node_queue_depth", "Fetched requests waiting at a hospital node.", ["hospital"]
)
NODE_MODEL_SECONDS = Histogram(
    "fedllm_node_model_duration_seconds",
    "Model time per request at a hospital node (DP decoding or an aggregate query).",
    ["hospital"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300),
)
BUDGET_LIMIT = Gauge(
    "fedllm_budget_limit_epsilon",
    "Privacy budget per window (epsilon at the configured delta), by scope and subject.",
    ["scope", "subject"],
)
BUDGET_REMAINING = Gauge(
    "fedllm_budget_remaining_epsilon",
    "Privacy budget left in the current window, by scope (department, hospital) and subject.",
    ["scope", "subject"],
)
HOSPITAL_SPENT = Counter(
    "fedllm_hospital_epsilon_spent_total",
    "Epsilon committed for answers released by each hospital node.",
    ["hospital"],
)
AUDIT_HEAD_AGE = Gauge(
    "fedllm_audit_chain_head_age_seconds",
    "Seconds since the newest row of each audit hash chain was written.",
    ["chain"],
)
AUDIT_VERIFY_OK = Gauge(
    "fedllm_audit_verify_ok",
    "1 when the last periodic audit verification (chain + anchor) passed, else 0.",
)
AUDIT_ANCHOR_TIME = Gauge(
    "fedllm_audit_anchor_timestamp_seconds",
    "Unix time of the last signed audit checkpoint (anchor) written outside the database.",
)

_allowed: dict[str, frozenset[str]] = {}


def bound_labels(settings: Settings) -> None:
    """Allow hospital and department labels from the configuration only."""
    _allowed["hospital"] = frozenset(h.id for h in settings.hospitals)
    _allowed["department"] = frozenset(settings.budget.department_epsilon) | frozenset(
        d for h in settings.hospitals for d in h.departments
    )


def bounded(kind: str, value: str) -> str:
    """`value` when it is a configured hospital/department (or none are configured), else other."""
    allowed = _allowed.get(kind)
    return value if allowed is None or value in allowed else "other"


@contextmanager
def stage(
    service: str, name: str, *, request_id: str = "", headers: Any = None, messages: int = 1
) -> Iterator[None]:
    """Count and time one message (or a batch of `messages`) through a stage (an exception
    counts as an error); given the message's `headers`, the block runs in a trace span
    continuing the context they carry; its log lines carry `request_id`."""
    started = time.perf_counter()
    outcome = "error"
    traced = tracing.span(f"{service} {name}", headers) if headers is not None else nullcontext()
    try:
        with traced, logs.bound(request_id=request_id):
            yield
        outcome = "ok"
    finally:
        STAGE_REQUESTS.labels(service, name, outcome).inc(messages)
        STAGE_LATENCY.labels(service, name).observe(time.perf_counter() - started)


def record_lag(service: str, consumer: Any, batches: dict[Any, list[Any]]) -> None:
    """Set each fetched partition's lag: its high watermark minus the offset after the batch."""
    for tp, msgs in batches.items():
        if not msgs:
            continue
        try:
            high = consumer.highwater(tp)
        except Exception:  # partition revoked meanwhile
            continue
        if high is not None:
            lag = max(0, high - (msgs[-1].offset + 1))
            CONSUMER_LAG.labels(service, tp.topic, str(tp.partition)).set(lag)


def record_budget(scope: str, subject: str, *, limit: float, remaining: float) -> None:
    """Publish one department's or hospital's budget balance."""
    subject = bounded(scope, subject)
    BUDGET_LIMIT.labels(scope, subject).set(limit)
    BUDGET_REMAINING.labels(scope, subject).set(max(0.0, remaining))


def record_node_queue(hospital: str, depth: int) -> None:
    NODE_QUEUE_DEPTH.labels(bounded("hospital", hospital)).set(depth)


@contextmanager
def model_time(hospital: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        NODE_MODEL_SECONDS.labels(bounded("hospital", hospital)).observe(
            time.perf_counter() - started
        )


def record_hospital_spend(hospital: str, epsilon: float) -> None:
    if hospital and epsilon > 0:
        HOSPITAL_SPENT.labels(bounded("hospital", hospital)).inc(epsilon)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def metric_names(registries: Iterable[Any] = (REGISTRY,)) -> set[str]:
    """Every series name the registries can expose, labelled or not yet observed."""
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
    return names


class _Handler(BaseHTTPRequestHandler):
    service = ""
    settings: Settings | None = None

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._reply(200, b"alive\n")
        elif path == "/readyz":
            from fedllm.common.lifecycle import ready_path

            assert self.settings is not None
            ready = ready_path(self.settings, self.service).exists()
            self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
        else:
            self._reply(404, b"not found\n")

    def _reply(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: quiet
        pass


def start_ops_server(
    settings: Settings, service: str, *, port: int, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz (the process answers) and /readyz (the service's readiness
    marker exists) on a daemon thread; returns the server (its port when `port` is 0)."""
    handler = type("OpsHandler", (_Handler,), {"service": service, "settings": settings})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"{service}-ops", daemon=True).start()
    return server


def serve_metrics(settings: Settings, service: str) -> None:
    """Serve /metrics, /healthz and /readyz on `settings.metrics_port` when it is set."""
    bound_labels(settings)
    if settings.metrics_port > 0:
        start_ops_server(settings, service, port=settings.metrics_port)
        log.info("%s serves /metrics, /healthz, /readyz on :%d", service, settings.metrics_port)

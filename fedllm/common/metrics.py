"""Prometheus exposition for services without an HTTP server of their own."""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

from fedllm.common.config import Settings

log = logging.getLogger(__name__)

MESSAGES = Counter("fedllm_messages_total", "Messages handled", ["service", "topic", "outcome"])


def serve_metrics(settings: Settings, service: str) -> None:
    """Serve /metrics on `settings.metrics_port` when it is set (compose sets it per service)."""
    if settings.metrics_port > 0:
        start_http_server(settings.metrics_port, addr="0.0.0.0")
        log.info("%s serves /metrics on :%d", service, settings.metrics_port)

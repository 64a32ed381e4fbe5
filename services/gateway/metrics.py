"""Prometheus metrics, one registry per app instance (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fedllm_gateway_http_requests_total",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedllm_gateway_http_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.inference = Counter(
            "fedllm_gateway_inference_total",
            "Inference requests by terminal outcome (ok, rejected, failed, timeout, "
            "gateway_timeout).",
            ["outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fedllm_gateway_inference_in_flight",
            "Inference requests awaiting their result.",
            registry=self.registry,
        )
        self.denied = Counter(
            "fedllm_gateway_denied_total",
            "Requests refused before reaching the pipeline, by reason class.",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""OpenTelemetry traces across the Kafka hops: W3C `traceparent` in every message's headers.

Every message a service sends through `Bus.send` carries the current trace context; every stage
that handles a message (`metrics.stage(..., headers=msg.headers)`) runs in a span whose parent is
the context the message carried. So one request is one trace: gateway → accountant → router →
node → accountant → gateway, and the auditor's span for each of its audit events.

Export is off by default: spans are made (so ids propagate and logs carry the trace id) but go
nowhere until OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) names an OTLP/HTTP collector,
e.g. http://otel-collector:4318. The other standard OTEL_* variables apply as usual.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)
TRACER = "fedllm"
_state: dict[str, Any] = {}


def setup(service: str) -> None:
    """Install the SDK tracer provider once per process; add the OTLP exporter when configured."""
    if _state.get("provider") is not None:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider(resource=Resource.create({"service.name": f"fedllm-{service}"}))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("traces exported over OTLP/HTTP to %s", endpoint)
    trace.set_tracer_provider(provider)
    _state["provider"] = trace.get_tracer_provider()
    _state.pop("tracer", None)


class _Headers:
    """Getter/setter for Kafka headers: a list of (str, bytes) pairs."""

    @staticmethod
    def get(carrier: Iterable[tuple[str, bytes]], key: str) -> list[str] | None:
        values = [v.decode("latin-1") for k, v in carrier or () if k == key and v is not None]
        return values or None

    @staticmethod
    def keys(carrier: Iterable[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier or ()]


def inject_headers() -> list[tuple[str, bytes]]:
    """The current trace context as Kafka headers ([] outside any span)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


def extract(headers: Any) -> context.Context:
    """The context in Kafka headers (pairs, or a mapping as faust gives) or HTTP headers."""
    if isinstance(headers, Mapping):
        pairs = [
            (str(k).lower(), v if isinstance(v, bytes) else str(v).encode("latin-1"))
            for k, v in headers.items()
        ]
    else:
        pairs = list(headers or ())
    return propagate.extract(pairs, getter=_Headers)  # type: ignore[arg-type]


@contextmanager
def span(
    name: str, headers: Any = None, *, kind: SpanKind = SpanKind.CONSUMER, **attributes: str
) -> Iterator[None]:
    """Run the block in a span whose parent is the context carried by `headers` (or the current
    span when `headers` is None)."""
    tracer = _state.get("tracer")
    if tracer is None:  # one tracer per process: get_tracer builds a new one on every call
        tracer = _state["tracer"] = trace.get_tracer(TRACER)
    parent = extract(headers) if headers is not None else None
    with tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes or None
    ):
        yield


def server_span(name: str, headers: Any) -> Any:
    """The gateway's span for an HTTP request: FastAPI's own telemetry may already have opened
    the server span (continuing the client's traceparent); then nest in it, else start from
    the request headers."""
    if trace.get_current_span().get_span_context().is_valid:
        return span(name, None, kind=SpanKind.INTERNAL)
    return span(name, headers, kind=SpanKind.SERVER)


def trace_id_of(headers: Iterable[tuple[str, bytes]] | None) -> str:
    """The trace id (32 hex digits) a message's headers carry, or ""."""
    ctx = trace.get_current_span(extract(headers)).get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


class TraceMemory:
    """The trace context of recent requests, for work a service does later outside the message
    that started it (the router's retries and queued dispatches run from its timer)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._headers: dict[str, list[tuple[str, bytes]]] = {}

    def remember(self, request_id: str) -> None:
        headers = inject_headers()
        if request_id and headers:
            self._headers.pop(request_id, None)
            self._headers[request_id] = headers
            while len(self._headers) > self.capacity:  # oldest first (insertion order)
                self._headers.pop(next(iter(self._headers)))

    def resume(self, request_id: str | None, name: str) -> Any:
        """A span continuing `request_id`'s trace when no span is current, else a no-op."""
        from contextlib import nullcontext

        stored = self._headers.get(request_id or "")
        if stored is None or trace.get_current_span().get_span_context().is_valid:
            return nullcontext()
        return span(name, stored, kind=SpanKind.INTERNAL)

"""Trace context through Kafka headers on the real broker: a stage continues the trace of the
message it handles, and what it sends carries that trace on."""

from __future__ import annotations

import uuid

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fedllm.common import metrics, tracing
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, make_producer
from tests.kafka_helpers import collect, inference_request, unique_namespace


def exporter() -> InMemorySpanExporter:
    tracing.setup("test")
    exp = InMemorySpanExporter()
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exp))  # type: ignore[attr-defined]
    return exp


async def test_a_stage_continues_the_trace_its_message_carries(kafka_bootstrap: str) -> None:
    spans = exporter()
    settings = Settings(
        mode="demo", kafka_bootstrap=kafka_bootstrap, topic_namespace=unique_namespace()
    )
    first, second = (f"ops-trace-{uuid.uuid4().hex[:8]}-{n}" for n in (1, 2))
    producer = make_producer(settings)
    await producer.start()
    try:
        bus = Bus(producer, settings.topic_namespace)
        with tracing.span("client", None, kind=trace.SpanKind.PRODUCER):
            root = trace.get_current_span().get_span_context()
            await bus.send(first, "InferenceRequest", inference_request(), key="u1")
        [msg] = await collect(settings, first, raw=True, until=lambda m: len(m) >= 1)
        assert tracing.trace_id_of(msg.headers) == f"{root.trace_id:032x}"
        with metrics.stage("svc", "Hop", headers=msg.headers, request_id="r1"):
            hop = trace.get_current_span().get_span_context()
            await bus.send(second, "InferenceRequest", inference_request(), key="u1")
        [out] = await collect(settings, second, raw=True, until=lambda m: len(m) >= 1)
    finally:
        await producer.stop()
    assert hop.trace_id == root.trace_id and hop.span_id != root.span_id
    assert tracing.trace_id_of(out.headers) == f"{root.trace_id:032x}"
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert finished["svc Hop"].parent.span_id == root.span_id
    assert finished["svc Hop"].context.trace_id == root.trace_id


def test_no_context_no_headers() -> None:
    assert tracing.inject_headers() == [] or trace.get_current_span().get_span_context().is_valid
    assert tracing.trace_id_of([]) == ""
    assert tracing.trace_id_of([("traceparent", b"garbage")]) == ""


def test_trace_memory_resumes_a_request_trace_outside_its_message() -> None:
    exporter()
    memory = tracing.TraceMemory(capacity=2)
    with tracing.span("decision", None):
        original = trace.get_current_span().get_span_context().trace_id
        memory.remember("r1")
    for rid in ("r2", "r3"):
        with tracing.span(rid, None):
            memory.remember(rid)
    with memory.resume("r3", "timer dispatch"):
        assert trace.get_current_span().get_span_context().trace_id != original
    memory.remember("none-outside-a-span")  # nothing to remember: no-op
    with memory.resume("r1", "timer dispatch"):  # evicted (capacity 2): no span
        assert not trace.get_current_span().get_span_context().is_valid
    memory = tracing.TraceMemory()
    with tracing.span("decision", None):
        kept = trace.get_current_span().get_span_context().trace_id
        memory.remember("r1")
    with memory.resume("r1", "timer dispatch"):
        assert trace.get_current_span().get_span_context().trace_id == kept

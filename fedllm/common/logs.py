"""JSON log lines: service, level, logger, message, and the request and trace ids in scope.

`bound(request_id=...)` puts a request id in scope for everything logged inside it (a
contextvar, so concurrent asyncio tasks keep their own); the trace id is the current
OpenTelemetry span's, when tracing is on. Services log ids, outcomes and reasons — never
prompts, answers, records, passwords or tokens; as a second line of defence any JWT-shaped or
bearer string in a message is redacted here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str] = ContextVar("fedllm_request_id", default="")

_JWT = re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


@contextmanager
def bound(*, request_id: str = "") -> Iterator[None]:
    """Log lines inside carry `request_id` (nothing changes when it is empty)."""
    if not request_id:
        yield
        return
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


def current_trace_id() -> str:
    """The active OpenTelemetry trace id as 32 hex digits, or "" (no tracing or no span)."""
    try:
        from opentelemetry import trace
    except ImportError:  # tracing is optional
        return ""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", text))


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        trace_id = current_trace_id()
        if trace_id:
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)

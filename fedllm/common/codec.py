"""Avro codec for the schemas in `schemas/*.avsc` (fastavro, schemaless + headers).

Every message carries its schema's full name and fingerprint (CRC-64-AVRO of the parsing
canonical form, hex) in headers; a reader resolves the writer schema by that fingerprint.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, TypeVar, cast

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

SCHEMA_HEADER = "fedllm-schema"
FINGERPRINT_HEADER = "fedllm-fp"

# Parse order: referenced types first.
SCHEMA_FILES = (
    "inference_request.avsc",
    "budget_decision.avsc",
    "routed_request.avsc",
    "inference_result.avsc",
    "node_heartbeat.avsc",
    "audit_event.avsc",
    "budget_status.avsc",
    "budget_adjustment.avsc",
    "control_command.avsc",
    "fl_round_announcement.avsc",
    "fl_client_update.avsc",
    "fl_round_result.avsc",
)

Headers = list[tuple[str, bytes]]
R = TypeVar("R")


class DecodeError(ValueError):
    """A message that cannot be decoded with a known schema."""


@dataclass(frozen=True, slots=True)
class Schema:
    name: str  # full name, e.g. fedllm.v1.InferenceRequest
    short: str  # e.g. InferenceRequest
    parsed: dict[str, Any]
    fingerprint: str


def load_schema_texts() -> dict[str, dict[str, Any]]:
    """Raw JSON of every schema file, by file name."""
    root = resources.files("fedllm.schemas")
    return {f: json.loads((root / f).read_text()) for f in SCHEMA_FILES}


def parse_all(texts: dict[str, dict[str, Any]]) -> dict[str, Schema]:
    """Parse schema JSON (in SCHEMA_FILES order) into Schemas keyed by short name."""
    named: dict[str, Any] = {}
    out: dict[str, Schema] = {}
    for f in SCHEMA_FILES:
        parsed = parse_schema(texts[f], named_schemas=named)
        assert isinstance(parsed, dict), f  # every .avsc file is one named record
        fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
        name = parsed["name"]
        short = name.rsplit(".", 1)[-1]
        out[short] = Schema(name=name, short=short, parsed=parsed, fingerprint=fp)
    return out


@lru_cache(maxsize=1)
def registry() -> dict[str, Schema]:
    """Current schemas keyed by short name."""
    return parse_all(load_schema_texts())


@lru_cache(maxsize=1)
def _by_fingerprint() -> dict[str, Schema]:
    return {s.fingerprint: s for s in registry().values()}


def encode(short_name: str, record: Mapping[str, Any]) -> tuple[bytes, Headers]:
    """Encode `record` with schema `short_name`; returns (value, headers). Invalid -> ValueError."""
    schema = registry()[short_name]
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, schema.parsed, record, strict_allow_default=True)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"record does not match {schema.name}: {exc}") from exc
    headers = [
        (SCHEMA_HEADER, schema.name.encode()),
        (FINGERPRINT_HEADER, schema.fingerprint.encode()),
    ]
    return buf.getvalue(), headers


def decode(
    value: bytes | None, headers: Headers | Mapping[str, bytes] | None
) -> tuple[str, dict[str, Any]]:
    """Decode a message into (short schema name, record); raises DecodeError."""
    hdrs = dict(headers.items() if isinstance(headers, Mapping) else headers or [])
    fp = hdrs.get(FINGERPRINT_HEADER)
    if fp is None:
        raise DecodeError("missing schema fingerprint header")
    schema = _by_fingerprint().get(fp.decode(errors="replace"))
    if schema is None:
        raise DecodeError(f"unknown schema fingerprint {fp!r}")
    if value is None:
        raise DecodeError("empty message value")
    buf = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(buf, schema.parsed, schema.parsed)
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise DecodeError(f"cannot decode {schema.name}: {exc!r}") from exc
    if buf.tell() != len(value):
        raise DecodeError(f"{len(value) - buf.tell()} trailing bytes after {schema.name}")
    return schema.short, record  # type: ignore[return-value]


def decode_expect(
    short_name: str, value: bytes | None, headers: Headers | Mapping[str, bytes] | None
) -> dict[str, Any]:
    """Decode and check the message is a `short_name`; raises DecodeError otherwise."""
    name, record = decode(value, headers)
    if name != short_name:
        raise DecodeError(f"expected {short_name}, got {name}")
    return record


def decode_as(
    record_type: type[R], value: bytes | None, headers: Headers | Mapping[str, bytes] | None
) -> R:
    """`decode_expect` typed by a record of `fedllm.schemas.records` (named as its schema)."""
    return cast(R, decode_expect(record_type.__name__, value, headers))

"""The typed records (`fedllm.schemas.records`) against the `.avsc` contracts, for every schema
file: same field names, Python types matching the Avro types, `NotRequired` exactly where the
Avro field has a default (bytes fields excepted), and a record built with the TypedDict round-trips through the codec.

A field added to (or removed from, or retyped in) an `.avsc` without the same change to its
TypedDict fails `test_record_matches_schema`."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest

from fedllm.common import codec
from fedllm.schemas import records

SCHEMAS = Path(records.__file__).resolve().parent  # the .avsc files sit beside records.py
AVSC = sorted(p.name for p in SCHEMAS.glob("*.avsc"))

PRIMITIVES: dict[str, Any] = {
    "string": str,
    "bytes": bytes,
    "int": int,
    "long": int,
    "float": float,
    "double": float,
    "boolean": bool,
    "null": type(None),
}


def named_records(schema: Any) -> list[dict[str, Any]]:
    """Every record defined in a schema's JSON (the top one first, then nested ones)."""
    if isinstance(schema, list):
        return [r for s in schema for r in named_records(s)]
    if not isinstance(schema, dict):
        return []
    kind = schema["type"]
    if kind == "record":
        return [schema] + [r for f in schema["fields"] for r in named_records(f["type"])]
    if kind == "array":
        return named_records(schema["items"])
    if kind == "map":
        return named_records(schema["values"])
    return named_records(kind) if isinstance(kind, dict | list) else []


def python_type(avro: Any) -> Any:
    """The Python type a record field of Avro type `avro` must have."""
    if isinstance(avro, str):
        return PRIMITIVES.get(avro) or records.RECORDS[avro.rsplit(".", 1)[-1]]
    if isinstance(avro, list):
        branches = [python_type(b) for b in avro]
        return branches[0] if len(branches) == 1 else _union(branches)
    kind = avro["type"]
    if kind == "record":
        return records.RECORDS[avro["name"]]
    if kind == "array":
        return list[python_type(avro["items"])]  # type: ignore[misc]
    if kind == "map":
        return dict[str, python_type(avro["values"])]  # type: ignore[misc]
    if kind == "enum":
        return str
    return python_type(kind)


def _union(branches: list[Any]) -> Any:
    out = branches[0]
    for b in branches[1:]:
        out = out | b
    return out


def sample(tp: Any) -> Any:
    """A value of Python type `tp`, built from the TypedDict's own annotations."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return sample(next(a for a in args if a is not type(None)))
    if origin is list:
        return [sample(args[0])]
    if origin is dict:
        return {"k": sample(args[1])}
    if typing.is_typeddict(tp):
        return {k: sample(v) for k, v in typing.get_type_hints(tp).items()}
    return {str: "x", bytes: b"b", int: 3, float: 0.5, bool: True}[tp]


@pytest.mark.parametrize("avsc", AVSC)
def test_record_matches_schema(avsc: str) -> None:
    for rec in named_records(json.loads((SCHEMAS / avsc).read_text())):
        cls = records.RECORDS.get(rec["name"])
        assert cls is not None, f"{avsc}: no TypedDict {rec['name']} in fedllm.schemas.records"
        hints = typing.get_type_hints(cls)
        fields = {f["name"]: f for f in rec["fields"]}
        assert list(hints) == list(fields), f"{rec['name']}: fields differ from {avsc}"
        for name, f in fields.items():
            assert hints[name] == python_type(f["type"]), f"{rec['name']}.{name}"
        # fastavro cannot write a bytes field's default, so bytes fields stay required.
        defaulted = {n for n, f in fields.items() if "default" in f and f["type"] != "bytes"}
        assert cls.__optional_keys__ == defaulted, f"{rec['name']}: NotRequired != defaults"  # type: ignore[attr-defined]


def test_every_schema_file_is_in_the_codec() -> None:
    assert sorted(codec.SCHEMA_FILES) == AVSC


@pytest.mark.parametrize("avsc", AVSC)
def test_typed_record_round_trips(avsc: str) -> None:
    name = json.loads((SCHEMAS / avsc).read_text())["name"]
    cls = records.RECORDS[name]
    full = sample(cls)
    value, headers = codec.encode(name, full)
    assert codec.decode_as(cls, value, headers) == full
    # Only the required keys: the codec writes the defaults, and the decoded record has them all.
    required = {k: v for k, v in full.items() if k in cls.__required_keys__}  # type: ignore[attr-defined]
    value, headers = codec.encode(name, required)
    decoded = codec.decode_as(cls, value, headers)
    assert set(decoded) == set(full)
    assert {k: decoded[k] for k in required} == required

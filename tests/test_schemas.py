"""Avro contracts: codec round trips, and every schema reads data written with every earlier
committed version of itself (backward compatibility, checked against git history)."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import parse_schema

from fedllm.common import codec

ROOT = Path(__file__).resolve().parents[1]


def sample(schema: Any, named: dict[str, Any]) -> Any:
    """A value of every field for an Avro schema (parsed form)."""
    if isinstance(schema, str):
        if schema in named:
            return sample(named[schema], named)
        return {
            "string": "x",
            "int": 1,
            "long": 2,
            "double": 0.5,
            "float": 0.25,
            "boolean": True,
            "bytes": b"b",
            "null": None,
        }[schema]
    if isinstance(schema, list):
        branch = next((b for b in schema if b != "null"), "null")
        return sample(branch, named)
    named = {**schema.get("__named_schemas", {}), **named}
    kind = schema["type"]
    if kind == "record":
        return {f["name"]: sample(f["type"], named) for f in schema["fields"]}
    if kind == "array":
        return [sample(schema["items"], named)]
    if kind == "map":
        return {"k": sample(schema["values"], named)}
    if kind == "enum":
        return schema["symbols"][0]
    return sample(kind, named)


def versions_in_history() -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(commit, {file: schema json}) for every commit that touched schemas/."""
    try:
        commits = subprocess.run(
            ["git", "log", "--format=%H", "--", "schemas/"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    out = []
    for c in commits:
        texts = {}
        for f in codec.SCHEMA_FILES:
            shown = subprocess.run(
                ["git", "show", f"{c}:schemas/{f}"], cwd=ROOT, capture_output=True, text=True
            )
            if shown.returncode == 0:
                texts[f] = json.loads(shown.stdout)
        out.append((c[:10], texts))
    return out


def parse_present(texts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named: dict[str, Any] = {}
    parsed = {}
    for f in codec.SCHEMA_FILES:
        if f in texts:
            parsed[f] = parse_schema(texts[f], named_schemas=named)
    return parsed


def read_old_with_new(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, old, sample(old, {}))
    buf.seek(0)
    return fastavro.schemaless_reader(buf, old, new)


def test_every_message_has_a_schema() -> None:
    names = set(codec.registry())
    assert {
        "InferenceRequest",
        "BudgetDecision",
        "RoutedRequest",
        "InferenceResult",
        "NodeHeartbeat",
        "AuditEvent",
    } <= names


@pytest.mark.parametrize("name", sorted(codec.registry()))
def test_codec_round_trip_with_headers(name: str) -> None:
    schema = codec.registry()[name]
    record = sample(schema.parsed, {})
    value, headers = codec.encode(name, record)
    assert dict(headers)[codec.FINGERPRINT_HEADER] == schema.fingerprint.encode()
    got_name, got = codec.decode(value, headers)
    assert got_name == name and got == record


def test_decode_rejects_unknown_and_corrupt() -> None:
    value, headers = codec.encode(
        "NodeHeartbeat", sample(codec.registry()["NodeHeartbeat"].parsed, {})
    )
    with pytest.raises(codec.DecodeError, match="unknown schema"):
        codec.decode(value, [(codec.FINGERPRINT_HEADER, b"0000")])
    with pytest.raises(codec.DecodeError):
        codec.decode(value[:3], headers)
    with pytest.raises(codec.DecodeError, match="trailing"):
        codec.decode(value + b"\x00\x00", headers)
    with pytest.raises(ValueError, match="does not match"):
        codec.encode("NodeHeartbeat", {"hospital_id": 3})


def test_current_schemas_read_every_committed_version() -> None:
    history = versions_in_history()
    current = parse_present(codec.load_schema_texts())
    checked = 0
    for commit, texts in history:
        for f, old in parse_present(texts).items():
            record = read_old_with_new(old, current[f])
            assert set(record) == {fld["name"] for fld in current[f]["fields"]}, (commit, f)
            checked += 1
    # Always at least the current files against themselves (also the case in a fresh clone).
    for schema in current.values():
        read_old_with_new(schema, schema)
    assert checked >= len(history)


def test_incompatible_change_is_caught() -> None:
    """The check has teeth: a new required field without default cannot read old data."""
    texts = codec.load_schema_texts()
    old = parse_present(texts)["node_heartbeat.avsc"]
    broken = json.loads(json.dumps(texts["node_heartbeat.avsc"]))
    broken["fields"].append({"name": "rack", "type": "string"})
    new = parse_schema(broken, named_schemas={})
    with pytest.raises(Exception):  # noqa: B017 - fastavro raises SchemaResolutionError
        read_old_with_new(old, new)

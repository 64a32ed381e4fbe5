"""Avro contracts: codec round trips, and compatibility with every earlier committed version of
each schema, both ways (checked against git history; skipped where there is none):

- backward: the current schema reads data written with an old one (new reader, old writer);
- forward: an old schema reads data written with the current one (old reader, new writer), so a
  service not yet upgraded keeps reading what upgraded ones publish."""

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


def resolve(writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
    """Write a sample with `writer`, read it back with `reader` (Avro schema resolution)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, sample(writer, {}))
    buf.seek(0)
    return fastavro.schemaless_reader(buf, writer, reader)


def read_old_with_new(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Backward: new reader, old writer."""
    return resolve(writer=old, reader=new)


def read_new_with_old(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Forward: old reader, new writer."""
    return resolve(writer=new, reader=old)


def field_names(schema: dict[str, Any]) -> set[str]:
    return {f["name"] for f in schema["fields"]}


def history_or_skip() -> list[tuple[str, dict[str, dict[str, Any]]]]:
    history = versions_in_history()
    if not history:  # a tarball or shallow copy without schemas/ history: nothing to compare
        pytest.skip("no git history of schemas/: compatibility with earlier versions unchecked")
    return history


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
    history = history_or_skip()
    current = parse_present(codec.load_schema_texts())
    checked = 0
    for commit, texts in history:
        for f, old in parse_present(texts).items():
            record = read_old_with_new(old, current[f])
            assert set(record) == field_names(current[f]), (commit, f)
            checked += 1
    assert checked >= len(history)


def test_every_committed_version_reads_current_data() -> None:
    history = history_or_skip()
    current = parse_present(codec.load_schema_texts())
    checked = 0
    for commit, texts in history:
        for f, old in parse_present(texts).items():
            record = read_new_with_old(old, current[f])
            assert set(record) == field_names(old), (commit, f)
            checked += 1
    assert checked >= len(history)


def test_no_history_skips_rather_than_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without git history the compatibility tests skip: they never compare a schema with itself
    and report a pass."""
    monkeypatch.setitem(globals(), "versions_in_history", lambda: [])
    for test in (
        test_current_schemas_read_every_committed_version,
        test_every_committed_version_reads_current_data,
    ):
        with pytest.raises(pytest.skip.Exception):
            test()


def test_incompatible_change_is_caught() -> None:
    """The check has teeth: a new required field without default cannot read old data."""
    texts = codec.load_schema_texts()
    old = parse_present(texts)["node_heartbeat.avsc"]
    broken = json.loads(json.dumps(texts["node_heartbeat.avsc"]))
    broken["fields"].append({"name": "rack", "type": "string"})
    new = parse_schema(broken, named_schemas={})
    with pytest.raises(fastavro.read.SchemaResolutionError):
        read_old_with_new(old, new)


def test_forward_incompatible_change_is_caught() -> None:
    """The forward check has teeth: dropping a field old readers need (no default) leaves them
    unable to read new data."""
    texts = codec.load_schema_texts()
    old = parse_present(texts)["node_heartbeat.avsc"]
    broken = json.loads(json.dumps(texts["node_heartbeat.avsc"]))
    required = [f for f in broken["fields"] if "default" not in f]
    assert required, "node_heartbeat.avsc needs a field without a default for this test"
    broken["fields"].remove(required[0])
    new = parse_schema(broken, named_schemas={})
    with pytest.raises(fastavro.read.SchemaResolutionError):
        read_new_with_old(old, new)
    read_old_with_new(old, new)  # backward still fine: the new reader just ignores the field

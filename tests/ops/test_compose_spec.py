"""compose/docker-compose.yml against the Compose Specification (the `compose-spec` package: the
Rust compose_spec parser, strict about keys, types, durations, ports and mounts), after the same
variable interpolation `docker compose` does, with every variable from compose/env.example set."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_spec import PyCompose

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?+])([^}]*))?\}")


class _Plain(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # anchors and merge keys already resolved
        return True


def example_env() -> dict[str, str]:
    """Every variable named in env.example, with a stand-in value."""
    names = re.findall(
        r"^([A-Z_][A-Z0-9_]*)=", (ROOT / "compose" / "env.example").read_text(), re.MULTILINE
    )
    return {name: f"stand-in-{name.lower()}" for name in names}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR:+alt}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        var, op, arg = m.groups()
        have = env.get(var)
        if op in (":?", "?") and not have:
            raise KeyError(f"{var} is required: {arg}")
        if op == ":+":
            return arg if have else ""
        if have is not None and (have or op not in (":-",)):
            return have
        return arg if op in (":-", "-") else ""

    return VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def parse(doc: dict[str, Any]) -> PyCompose:
    return PyCompose.from_yaml(yaml.dump(doc, Dumper=_Plain, sort_keys=False))


def loaded() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), example_env())


def test_compose_file_is_valid_compose_spec() -> None:
    compose = parse(loaded())
    assert {
        "gateway",
        "accountant",
        "router",
        "auditor",
        "kafka",
        "postgres",
        "redis",
        "prometheus",
        "grafana",
        "topics",
        "migrate",
    } <= set(compose.service_names())


def test_every_required_variable_is_in_the_env_example() -> None:
    text = yaml.dump(yaml.safe_load(COMPOSE.read_text()))  # values only, not the comments
    required = {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) in (":?", "?")}
    assert required and required <= set(example_env())
    env = example_env()
    env.pop("JWT_SECRET")
    with pytest.raises(KeyError, match="JWT_SECRET"):
        interpolate(yaml.safe_load(COMPOSE.read_text()), env)


@pytest.mark.parametrize(
    "mutation",
    [
        ("services", "gateway", "restart", "sometimes"),
        ("services", "gateway", "portz", ["8080:8080"]),
        ("services", "kafka", "healthcheck", "interval", "5 parsecs"),
        ("services", "gateway", "ports", ["not-a-port"]),
        ("services", "gateway", "depends_on", "kafka", "condition", "service_whenever"),
    ],
)
def test_the_validation_has_teeth(mutation: tuple[Any, ...]) -> None:
    doc = copy.deepcopy(loaded())
    *path, key, value = mutation
    node = doc
    for part in path:
        node = node[part]
    node[key] = value
    with pytest.raises(ValueError):
        parse(doc)

"""The compose deployment: every fedllm container runs a real `fedllm` subcommand.

Parses compose/docker-compose.yml and hands each service's command to the CLI's own parser
(`fedllm.cli.build_parser()`), so a renamed or missing subcommand fails here, not at deploy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose" / "docker-compose.yml"
SECRETS = ("JWT_SECRET", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def fedllm_services() -> dict[str, list[str]]:
    """Service name -> command, for every service whose command runs `fedllm`."""
    out = {}
    for name, svc in compose()["services"].items():
        command = svc.get("command")
        if isinstance(command, str):
            command = command.split()
        if command and command[0] == "fedllm":
            out[name] = command
    return out


def test_expected_services_are_there() -> None:
    services = compose()["services"]
    for infra in ("kafka", "postgres", "redis", "prometheus", "grafana"):
        assert infra in services
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft
    commands = {" ".join(c[1:]) for c in fedllm_services().values()}
    assert commands >= {
        "gateway",
        "accountant",
        "router",
        "auditor",
        "migrate",
        "topics",
        "node --hospital st_mary",
        "node --hospital city_general",
        "node --hospital northside",
    }


@pytest.mark.parametrize("service", sorted(fedllm_services()))
def test_command_parses_with_the_cli(service: str) -> None:
    from fedllm.cli import build_parser

    command = fedllm_services()[service]
    args = build_parser().parse_args(command[1:])
    assert args.command == command[1]
    assert callable(args.func)


def test_services_share_one_image_and_wait_for_the_jobs() -> None:
    services = compose()["services"]
    runs = fedllm_services()
    assert len({services[name]["image"] for name in runs}) == 1
    for name in runs:
        env = services[name]["environment"]
        for var in ("KAFKA_BOOTSTRAP", "DATABASE_URL", "REDIS_URL", "JWT_SECRET"):
            assert var in env, (name, var)
        if name not in ("topics", "migrate"):
            deps = services[name]["depends_on"]
            assert deps["topics"]["condition"] == "service_completed_successfully"
            assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_no_secret_values_are_committed() -> None:
    text = COMPOSE.read_text()
    for var in SECRETS:
        # every use is a required interpolation, never a literal value
        assert re.search(rf"\$\{{{var}:\?[^}}]*\}}", text), var
        assert not re.search(rf"^\s*{var}:\s*(?!\$\{{)\S", text, re.MULTILINE), var
    example = (ROOT / "compose" / "env.example").read_text()
    for var in SECRETS:
        assert re.search(rf"^{var}=$", example, re.MULTILINE), var


def test_prometheus_scrapes_the_gateway_metrics() -> None:
    prom = yaml.safe_load((ROOT / "compose" / "prometheus.yml").read_text())
    targets = [
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert "gateway:8080" in targets
    gateway_env = compose()["services"]["gateway"]["environment"]
    assert str(gateway_env["FEDLLM_GATEWAY_PORT"]) == "8080"

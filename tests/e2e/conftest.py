"""The whole pipeline as real processes: embedded broker (or KAFKA_BOOTSTRAP), real Postgres,
two hospitals running the real SmolLM2 model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fedllm.common.config import HospitalConfig
from fedllm.launcher import Pipeline
from tests.kafka_helpers import unique_namespace
from tests.ops.otlp import Collector

ROOT = Path(__file__).resolve().parents[2]
HOSPITALS = [
    HospitalConfig(id="st_mary", departments=["cardiology", "emergency", "general"], seed=11),
    HospitalConfig(id="northside", departments=["cardiology", "research", "radiology"], seed=33),
]


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[Collector]:
    """Receives the spans every pipeline process exports (tests/e2e/test_traces.py)."""
    with Collector() as collector:
        yield collector


@pytest.fixture(scope="session")
def pipeline(postgres_admin_url: str, otlp_collector: Collector) -> Iterator[Pipeline]:
    from tests.conftest import scratch_database

    with scratch_database(postgres_admin_url) as db:
        pipe = Pipeline(
            data_dir=ROOT / ".fedllm",  # shares the model cache and generated records
            database_url=db,
            hospitals=HOSPITALS,
            env={
                "FEDLLM_TOPIC_NAMESPACE": unique_namespace(),  # its own topics on the broker
                "FEDLLM_NODE_TIMEOUT_S": "40",
                "FEDLLM_REQUEST_TIMEOUT_S": "120",
                "FEDLLM_NODE_TTL_S": "4",
                "FEDLLM_DP_GROUPS": "4",
                # These tests count fresh releases; tests/e2e/test_cache.py runs its own gateway
                # with the answer cache (which would be on here if REDIS_URL were exported).
                "FEDLLM_GATEWAY_CACHE__ENABLED": "false",
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.url,
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        with pipe:
            yield pipe


@pytest.fixture
def client(pipeline: Pipeline) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pipeline.gateway_url, timeout=180) as c:
        yield c


def bearer(pipeline: Pipeline, user_id: str, department: str, role: str = "doctor") -> dict:
    from fedllm.services.gateway.tokens import mint_token

    token = mint_token(pipeline.settings, user_id=user_id, department=department, role=role)
    return {"Authorization": f"Bearer {token}"}


def ask_body(prompt: str, *, epsilon: float, department: str, max_tokens: int = 8, **kw) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "privacy_budget": epsilon,
        "require_consensus": False,
        "priority": "normal",
        "department": department,
    }
    body.update(kw)
    return body

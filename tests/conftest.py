"""Shared fixtures: a real Kafka-protocol broker, a real Postgres, a real Redis.

Order of preference for each: the env var (KAFKA_BOOTSTRAP, DATABASE_URL, REDIS_URL), then a
testcontainers container when a Docker engine answers, then the local server / embedded broker.
Each starts only when a test asks for it (session scope), never at import or collection.

Two speeds: a test that needs none of them (no fixture below in its closure, no model or
generated hospital, not e2e, not slow) and whose module does not import the model stack
(torch, transformers, peft, opacus) at its top is marked ``unit``; ``python -m pytest -m unit
-q`` runs that lane without a broker, database or Redis (README, Development), and does not
even import the model-stack modules (importing torch alone takes seconds).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedllm.embedded import EmbeddedBroker

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/15"

# Fixtures that reach a broker, Postgres or Redis (directly or through the pipeline).
INFRA_FIXTURES = frozenset(
    {
        "kafka_bootstrap",
        "postgres_admin_url",
        "database_url",
        "fresh_database_url",
        "redis_url",
        "pg_engine",
        "pipeline",
    }
)
# Fixtures that are slow to set up though local (a model, generated hospitals): integration lane.
HEAVY_FIXTURES = frozenset(
    {"tiny", "models_dir", "clinosim_source", "hospital_data_dir", "fl_sources", "fl_data_dir"}
)
# Parametrised fixtures whose value picks a backend at run time (tests/auditor `engine`).
INFRA_PARAMS = frozenset({"postgres"})


# A module importing one of these at its top is in the integration lane (all its tests).
MODEL_STACK_IMPORT = re.compile(r"^(?:import|from) (?:torch|transformers|peft|opacus)\b", re.M)


@functools.cache
def imports_model_stack(path: Path) -> bool:
    """True when the test module at `path` imports torch/transformers/peft/opacus at its top
    (read as text: deciding this must not import it)."""
    return bool(MODEL_STACK_IMPORT.search(path.read_text(encoding="utf-8")))


def _unit_lane_only(config: pytest.Config) -> bool:
    return config.getoption("markexpr", "").strip() == "unit"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m unit` does not import a model-stack module: none of its tests is in the lane."""
    if (
        _unit_lane_only(config)
        and collection_path.suffix == ".py"
        and collection_path.name.startswith("test_")
        and imports_model_stack(collection_path)
    ):
        return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Say so when collecting the unit lane imported the model stack (seconds of CPU each run):
    a test module imports, at its top, a module that imports torch at its top."""
    if _unit_lane_only(session.config):
        loaded = sorted({"torch", "transformers", "peft", "opacus"} & set(sys.modules))
        if loaded:
            warnings.warn(
                f"collecting the unit lane imported {', '.join(loaded)}: import the model "
                "stack inside the tests or fixtures that need it",
                pytest.PytestWarning,
                stacklevel=1,
            )


def _needs_infra(item: pytest.Item) -> bool:
    if (INFRA_FIXTURES | HEAVY_FIXTURES) & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and bool(INFRA_PARAMS & set(map(str, callspec.params.values())))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the unit lane: no infrastructure fixture, no model stack, not e2e, not slow."""
    for item in items:
        if (
            _needs_infra(item)
            or imports_model_stack(item.path)
            or item.get_closest_marker("e2e")
            or item.get_closest_marker("slow")
        ):
            continue
        item.add_marker(pytest.mark.unit)


def docker_available() -> bool:
    """True when a Docker engine answers (then testcontainers is used)."""
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP"):
        yield os.environ["KAFKA_BOOTSTRAP"]
    elif docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    else:
        with EmbeddedBroker() as broker:
            yield broker.bootstrap


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A Postgres server URL we may create databases on."""
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        yield os.environ["DATABASE_URL"]
    elif docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver="psycopg") as pg:
            yield pg.get_connection_url()
    else:
        yield LOCAL_POSTGRES


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh, empty Postgres database on the admin server, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from fedllm.common.db import normalise_url

    admin_url = normalise_url(admin_url)
    name = f"fedllm_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """One fresh Postgres database for the session."""
    with scratch_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def fresh_database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh Postgres database for one test."""
    with scratch_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
    elif docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer() as r:
            yield f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"
    else:
        yield LOCAL_REDIS

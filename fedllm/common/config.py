"""Settings: environment variables over an optional YAML file (FEDLLM_CONFIG) over defaults.

The well-known variables KAFKA_BOOTSTRAP, DATABASE_URL, REDIS_URL and JWT_SECRET are read
without prefix; everything else is FEDLLM_<FIELD> (nested fields use `__`).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PLACEHOLDER_SECRETS = {"", "changeme", "secret", "demo-secret-not-for-production-use-only"}
DEMO_JWT_SECRET = "demo-secret-not-for-production-use-only"


#: clinosim catchment populations of the hospital presets (patients ≈ half or more of it;
#: measured in docs/utility.md). `fedllm up` and the benchmarks use "realistic"; the demo
#: uses "demo" and says so; tests use the small default of HospitalConfig.
POPULATION_PRESETS = {"realistic": 4000, "demo": 400, "test": 20}


class HospitalConfig(BaseModel):
    """One simulated or real hospital node."""

    id: str
    departments: list[str]
    seed: int = 0
    population: int = 20
    # Public label of the data set (e.g. its load date); bump it on new data or an erasure.
    data_version: str = ""
    # Where the hospital's data and processing are (e.g. "EU", "US"); "" = unspecified, which
    # no residency-restricted request may use (fedllm/common/residency.py).
    region: str = ""


class BudgetConfig(BaseModel):
    """Privacy budgets: epsilon per window, at `delta`."""

    delta: float = 1e-5
    window_seconds: int = 86_400
    user_epsilon: float = 10.0
    department_epsilon: dict[str, float] = Field(
        default_factory=lambda: {
            "emergency": 20.0,
            "cardiology": 15.0,
            "radiology": 10.0,
            "general": 5.0,
            "research": 2.0,
        }
    )
    max_query_epsilon: float = 10.0


def layered_sources(
    settings_cls: type[BaseSettings],
    init_settings: PydanticBaseSettingsSource,
    env_settings: PydanticBaseSettingsSource,
    file_secret_settings: PydanticBaseSettingsSource,
    *,
    section: str | None = None,
) -> tuple[PydanticBaseSettingsSource, ...]:
    """Init kwargs, then env vars, then the FEDLLM_CONFIG YAML file (or one `section` of it),
    then secret files."""
    sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
    path = os.environ.get("FEDLLM_CONFIG")
    if path:
        sources.append(
            YamlConfigSettingsSource(settings_cls, yaml_file=path, yaml_config_section=section)
        )
    sources.append(file_secret_settings)
    return tuple(sources)


def default_hospitals() -> list[HospitalConfig]:
    return [
        HospitalConfig(id="st_mary", departments=["emergency", "cardiology", "general"], seed=11),
        HospitalConfig(
            id="city_general", departments=["general", "radiology", "research"], seed=22
        ),
        HospitalConfig(
            id="northside", departments=["cardiology", "emergency", "radiology"], seed=33
        ),
    ]


class Settings(BaseSettings):
    """Every service reads this; each uses the part it needs."""

    model_config = SettingsConfigDict(
        env_prefix="FEDLLM_", env_nested_delimiter="__", extra="ignore", populate_by_name=True
    )

    mode: Literal["demo", "prod"] = "prod"
    kafka_bootstrap: str = Field(
        default="", validation_alias=AliasChoices("KAFKA_BOOTSTRAP", "FEDLLM_KAFKA_BOOTSTRAP")
    )
    # Prefix of every topic name (fedllm.common.topics.scoped); "" = the names as written.
    # Tests give each pipeline a unique one so no two share traffic on one broker.
    topic_namespace: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_ssl_cafile: str = ""
    kafka_ssl_certfile: str = ""
    kafka_ssl_keyfile: str = ""
    database_url: str = Field(
        default="", validation_alias=AliasChoices("DATABASE_URL", "FEDLLM_DATABASE_URL")
    )
    redis_url: str = Field(
        default="", validation_alias=AliasChoices("REDIS_URL", "FEDLLM_REDIS_URL")
    )
    jwt_secret: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("JWT_SECRET", "FEDLLM_JWT_SECRET")
    )
    jwt_algorithm: str = "HS256"
    # Ed25519 reservation grants (fedllm.common.grants): the accountant signs with the private
    # seed (base64, 32 bytes); nodes verify with the public key (base64). Demo mode derives both
    # from the JWT secret when they are empty.
    reservation_signing_key: SecretStr = SecretStr("")
    reservation_verify_key: str = ""
    jwt_audience: str = "fedllm"
    data_dir: Path = Path(".fedllm")

    # Kafka client tuning (see shared BROKER notes: short fetch waits, explicit topics).
    fetch_max_wait_ms: int = 10
    # Consumers off a request's path (router and gateway heartbeat/budget readers, the
    # auditor): on a broker that does not wake a waiting fetch, every consumer makes
    # 1000/fetch_max_wait_ms round trips a second while idle, so these wait longer.
    background_fetch_max_wait_ms: int = 250
    # Every consumer's fetch wait once none of its fetches brought data for `idle_after_ms`
    # (fedllm.common.fetch_wait): an idle pipeline then polls the broker 10× less; the first
    # request after an idle spell pays up to this much per hop. ≤ the fetch wait: off.
    idle_fetch_max_wait_ms: int = 100
    idle_after_ms: int = 1_000
    # A second, longer wait once idle for `deep_idle_after_ms`: a pipeline left alone polls 5×
    # less again (docs/performance.md: idle 17 % → 9 % of a core); the first request after such
    # a silence pays up to this much per hop. On Apache Kafka a waiting fetch is answered as
    # soon as data arrives, so neither wait costs latency there.
    deep_idle_fetch_max_wait_ms: int = 500
    deep_idle_after_ms: int = 30_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000

    # Request lifecycle.
    request_timeout_s: float = 120.0
    node_timeout_s: float = 60.0
    heartbeat_interval_s: float = 1.0
    node_ttl_s: float = 5.0
    max_tokens_limit: int = 256

    # Accountant (faust): the most events per ledger transaction (a batch is what arrived while
    # the previous one was handled; nothing waits on a timer), and offsets acked between two
    # commits besides the periodic commit every `accountant_commit_interval_s` (replays are
    # no-ops by request id, so committing per message only adds a broker round trip before
    # each one).
    accountant_batch_max: int = 256
    accountant_commit_every: int = 1_000
    accountant_commit_interval_s: float = 0.5

    # Router: strategy by name (services/router/strategies.py; default = the winner of
    # bench/routing_sim.py), the batching window a batch strategy places jointly, and hedging of
    # high-priority requests (a hedge is a second charge: docs/routing.md).
    router_strategy: str = "privacy_aware"
    router_batch_window_ms: int = 50
    # The window is waited only when one poll already brought this many decisions (load is
    # there to place jointly); a lone decision under light load is placed at once.
    router_batch_min: int = 2
    router_hedge: bool = False
    # This router instance's stable name (one per replica): its RoutedRequests carry it, and on
    # a restart it re-adopts only the requests it routed (services/router/recovery.py).
    router_id: str = "router"
    # Which nodes the router admits: "configured" (the hospitals below, plus those an admin
    # approves via POST /v1/admin/nodes) or "open" (any node that sends heartbeats).
    node_admission: Literal["configured", "open"] = "configured"
    # Delivery (fedllm.common.delivery): handler attempts per event before it is dead-lettered
    # with a terminal outcome, and the exponential backoff between attempts.
    delivery_attempts: int = 5
    delivery_backoff_s: float = 0.2
    delivery_backoff_max_s: float = 5.0
    # Longest model work a node worker may do between two polls before its group evicts it.
    node_max_poll_interval_s: float = 1800.0
    # Fetched requests a node holds in its priority queue (services/node_worker/intake.py): a
    # high request overtakes queued normal/low work among these.
    node_intake_capacity: int = 32
    # Aggregate queries next to each other in that queue are answered as one batch of at most
    # this many: one ledger transaction for their draws and charges, one for their releases.
    node_batch_max: int = 16
    # False: the node loads no language model and answers aggregate queries only (generate
    # requests fail before anything is drawn, uncharged); for aggregate-only sites and tests.
    node_load_model: bool = True

    # Node worker: DP decoding over `dp_groups` disjoint patient groups; torch CPU threads
    # (0 = torch's default; 1 when several nodes share one machine, as in the embedded default).
    dp_groups: int = 8
    # Free-text questions that a public grammar reads as population or entity questions are
    # answered by DP aggregates / answer-level DP (services/node_worker/text_routes.py).
    answer_routes: bool = True
    torch_threads: int = 0
    max_prompt_chars: int = 4_000

    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    hospitals: list[HospitalConfig] = Field(default_factory=default_hospitals)
    # Data residency: department -> regions its requests may be routed to (missing or empty:
    # any region). A user's own `regions` narrow this further (docs/residency.md).
    department_regions: dict[str, list[str]] = Field(default_factory=dict)
    # Consensus (require_consensus): how many hospitals serving the department answer (k >= 2).
    consensus_k: int = Field(default=2, ge=2)

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    metrics_port: int = 0  # >0: non-HTTP services serve Prometheus /metrics on this port

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return layered_sources(settings_cls, init_settings, env_settings, file_secret_settings)

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        if self.mode == "demo" and not self.jwt_secret.get_secret_value():
            self.jwt_secret = SecretStr(DEMO_JWT_SECRET)
        return self

    def require_jwt_secret(self) -> str:
        """The JWT secret; outside demo mode a default or empty one is refused."""
        secret = self.jwt_secret.get_secret_value()
        if self.mode != "demo" and secret in PLACEHOLDER_SECRETS:
            raise ValueError("JWT_SECRET is empty or a placeholder; set a real secret")
        return secret

    def resolved_database_url(self) -> str:
        """DATABASE_URL, or a SQLite file under data_dir (the embedded default)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fedllm.db').resolve()}"

    def hospital(self, hospital_id: str) -> HospitalConfig:
        for h in self.hospitals:
            if h.id == hospital_id:
                return h
        raise KeyError(f"unknown hospital {hospital_id!r}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()

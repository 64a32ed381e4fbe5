"""HTTP request and response bodies. Limits come from Settings, so the published OpenAPI
document states the same bounds the gateway enforces."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from fedllm.common.config import Settings

Kind = Literal["generate", "aggregate"]
Priority = Literal["low", "normal", "high"]


def _json_integer(value: object) -> object:
    """JSON Schema's integer includes 1.0; accept an integral float as that int (no strings)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


def _encodable(value: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates cannot be encoded as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode") from None
    return value


class InferenceBodyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    max_tokens: int
    temperature: float
    privacy_budget: float
    require_consensus: bool = False
    priority: Priority = "normal"
    department: str | None = None
    kind: Kind = "generate"
    hospitals: list[str] = Field(default_factory=list)
    use_adapter: bool = False

    _prompt_unicode = field_validator("prompt")(_encodable)


def inference_body_model(settings: Settings) -> type[InferenceBodyBase]:
    """The POST /v1/inference body with this deployment's limits."""
    hospital_ids = sorted(h.id for h in settings.hospitals)
    departments = sorted(settings.budget.department_epsilon)
    return create_model(
        "InferenceBody",
        __base__=InferenceBodyBase,
        prompt=(
            str,
            Field(
                min_length=1,
                max_length=settings.max_prompt_chars,
                description="The question; for kind=aggregate a JSON query.",
            ),
        ),
        max_tokens=(
            JsonInt,
            Field(default=min(128, settings.max_tokens_limit), ge=1, le=settings.max_tokens_limit),
        ),
        temperature=(float, Field(default=0.7, ge=0.0, le=2.0, allow_inf_nan=False)),
        privacy_budget=(
            float,
            Field(
                gt=0.0,
                le=settings.budget.max_query_epsilon,
                allow_inf_nan=False,
                description="epsilon to spend on this query",
            ),
        ),
        department=(  # type: ignore[arg-type]
            Literal[tuple(departments)] | None,  # type: ignore[valid-type]
            Field(default=None, description="defaults to the token's department"),
        ),
        hospitals=(  # type: ignore[arg-type]
            list[Literal[tuple(hospital_ids)]],  # type: ignore[valid-type, misc]
            Field(
                default_factory=list,
                max_length=len(hospital_ids),
                description="empty: the router chooses",
            ),
        ),
    )


class CachedReleaseInfo(BaseModel):
    """The earlier release a cache hit re-serves (post-processing: it charged nothing now)."""

    release_id: str = Field(description="request id of the fresh release")
    released_at_ms: int = Field(description="when the release was made (epoch ms)")
    privacy_cost: float = Field(description="epsilon the release spent when it was made")
    epsilon: float = Field(description="epsilon its requester asked for")


class InferenceResponse(BaseModel):
    request_id: str
    response: str
    privacy_cost: float
    remaining_budget: float
    node_id: str
    processing_time: float = Field(description="seconds")
    model_time: float = Field(0.0, description="milliseconds the node spent in the model")
    is_private: bool
    tokens: int
    cached: bool = Field(False, description="true: an earlier release served from the cache")
    cached_release: CachedReleaseInfo | None = None
    success: bool = Field(True, description="true: the request was answered")
    consensus_reached: bool = Field(
        False,
        description="require_consensus: the hospitals' DP releases agree (docs/consensus.md); "
        "false when consensus was not requested",
    )
    adapter_hash: str = Field(
        "",
        description="use_adapter: sha256 of the approved federated adapter that answered "
        "(docs/federated.md); empty otherwise",
    )
    adapter_epsilon: float = Field(
        0.0,
        description="use_adapter: that adapter's training epsilon (max over the hospitals); "
        "the answer itself spent none",
    )
    confidence_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="require_consensus: agreement of the hospitals' DP releases in [0, 1], "
        "computed from DP releases and public configuration only; null otherwise",
    )


class ErrorBody(BaseModel):
    detail: str


class BudgetRefused(BaseModel):
    detail: str
    remaining_budget: float | None = None


class TimedOut(BaseModel):
    detail: str
    request_id: str


class Pending(BaseModel):
    """GET /v1/inference/{request_id} before the request has finished."""

    request_id: str
    status: str


class BudgetResponse(BaseModel):
    user_id: str
    department: str
    limit: float
    spent: float
    remaining: float
    department_remaining: float | None
    window_start: int = Field(description="epoch seconds")
    # Seed shapes of the design (additive; the same figures under the design's names).
    success: bool = True
    total_budget: float | None = Field(None, description="= limit (epsilon per window)")
    consumed: float | None = Field(None, description="= spent (epsilon in this window)")
    daily_limit: float | None = Field(
        None, description="epsilon per day at this window length: limit × 86400 / window"
    )
    last_refresh: int | None = Field(None, description="epoch seconds the window began")
    next_refresh: int | None = Field(None, description="epoch seconds the budget renews")


class PrivacyStatus(BaseModel):
    """GET /v1/privacy/status: the caller's budget and the deployment's public privacy terms."""

    success: bool = True
    accounting: str = Field(description="how spends compose (docs/privacy.md)")
    delta: float
    window_seconds: int
    max_query_epsilon: float
    user: BudgetResponse
    department_limit: float | None
    department_remaining: float | None


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)

    _unicode = field_validator("username", "password")(_encodable)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class Health(BaseModel):
    status: str
    # Under `fedllm up`: each service's pid, state (running | restarting), restarts, last exit.
    services: dict[str, dict[str, Any]] | None = None
    # Emergency controls in force: lockdown, halt, manually opened breakers (with reasons).
    emergency: dict[str, Any] | None = None


class Readiness(BaseModel):
    ready: bool
    broker: bool
    results_assigned: bool
    budgets_assigned: bool
    limiter: bool


# -- admin API --------------------------------------------------------------------------------

USER_ID_PATTERN = r"^[A-Za-z0-9_.@-]+$"


class BudgetResetBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field(
        min_length=1,
        max_length=500,
        pattern=r"\S",
        description="why the budget is reset (kept in the audit trail)",
    )

    _reason_unicode = field_validator("reason")(_encodable)


class UserBudgetReset(BudgetResetBase):
    scope: Literal["user"]
    subject: str = Field(
        min_length=1, max_length=128, pattern=USER_ID_PATTERN, description="the user id"
    )


def budget_reset_body(settings: Settings) -> object:
    """The POST /v1/admin/budget/reset body: a user, or a department this deployment has."""
    departments = sorted(settings.budget.department_epsilon)
    department_reset = create_model(
        "DepartmentBudgetReset",
        __base__=BudgetResetBase,
        scope=(Literal["department"], ...),  # type: ignore[arg-type, maybe-unrecognized-str-typeform]
        subject=(  # type: ignore[arg-type]
            Literal[tuple(departments)],  # type: ignore[valid-type]
            Field(description="a configured department"),
        ),
    )
    return Annotated[
        UserBudgetReset | department_reset,  # type: ignore[valid-type]
        Field(discriminator="scope"),
    ]


class BudgetResetAccepted(BaseModel):
    adjustment_id: str


class NodeInfo(BaseModel):
    hospital_id: str
    departments: list[str]
    queue_depth: int
    in_flight: int
    recent_latency_ms: float
    model: str
    device: str
    healthy: bool
    last_seen_ms: int = Field(description="sent_at_ms of the node's latest heartbeat")
    alive: bool = Field(description="heard from within node_ttl_s")


class HospitalView(BaseModel):
    id: str
    departments: list[str]
    population: int


class BudgetConfigView(BaseModel):
    delta: float
    window_seconds: int
    user_epsilon: float
    department_epsilon: dict[str, float]
    max_query_epsilon: float


class LimitsView(BaseModel):
    max_prompt_chars: int
    max_tokens_limit: int
    request_timeout_s: float
    node_timeout_s: float
    node_ttl_s: float
    heartbeat_interval_s: float
    dp_groups: int
    rate_window_s: int
    rate_limit_user: int
    rate_limit_address: int
    lockout_window_s: int
    lockout_user_failures: int
    lockout_address_failures: int


class UserView(BaseModel):
    username: str
    department: str
    role: str
    disabled: bool


class AuthView(BaseModel):
    jwt_algorithm: str
    jwt_audience: str
    jwt_kid: str
    jwt_previous_kids: list[str] = Field(description="key ids only, never the keys")
    jwt_leeway_s: int
    token_ttl_s: int
    roles: dict[str, list[str]]
    users: list[UserView] = Field(description="configured accounts (never password hashes)")


class InfrastructureView(BaseModel):
    kafka_bootstrap: str
    kafka_security_protocol: str
    database_url: str = Field(description="password redacted")
    redis_url: str = Field(description="password redacted; empty: in-process limiter")
    tls: bool
    mtls_required: bool
    forwarded_allow_ips: str


class AdminConfig(BaseModel):
    mode: str
    departments: list[str]
    hospitals: list[HospitalView]
    budget: BudgetConfigView
    limits: LimitsView
    auth: AuthView
    infrastructure: InfrastructureView

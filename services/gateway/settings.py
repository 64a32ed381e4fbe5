"""Gateway-only settings: users, roles, rate limits, lockout, TLS, key rotation.

Read from FEDLLM_GATEWAY_<FIELD> environment variables (nested fields use `__`, lists and
dicts as JSON) over the `gateway:` section of the shared YAML file (FEDLLM_CONFIG) over
defaults. The shared `fedllm.common.config.Settings` keeps the JWT secret, audience and
algorithm; this class adds what only the gateway needs.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fedllm.common.config import Settings, layered_sources
from fedllm.common.identity import (  # noqa: F401 - re-exported
    IdentitySettings,
    Permission,
    default_identifying_fields,
    default_roles,
)


class UserRecord(BaseModel):
    """One account allowed to obtain tokens; the password is stored as an argon2 hash only."""

    username: str = Field(min_length=1, max_length=64)
    password_hash: str = Field(min_length=1)
    department: str
    role: str
    disabled: bool = False
    # Data residency: regions this user's requests may go to (empty: the department's).
    regions: list[str] = Field(default_factory=list)

    @field_validator("password_hash")
    @classmethod
    def _argon2_only(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError(
                "password_hash must be an argon2 hash (see `fedllm gateway --hash-password`)"
            )
        return v


class CacheSettings(BaseModel):
    """The DP-aware answer cache (services/gateway/answer_cache.py); active when a Redis URL
    is known (``redis_url`` here, else REDIS_URL) and ``enabled``."""

    enabled: bool = True
    redis_url: str = ""  # empty: the shared REDIS_URL
    ttl_s: int = Field(default=86_400, ge=1)
    max_entries: int = Field(default=100_000, ge=1)
    # The published ε grid: a request's ε is rounded to the nearest multiple of this.
    epsilon_step: float = Field(default=0.1, gt=0.0, le=10.0)
    # Key for cache-key HMACs and value encryption; derived from the JWT secret when empty.
    secret: SecretStr = SecretStr("")
    timeout_s: float = Field(default=0.5, gt=0.0, le=5.0)  # per Redis call
    outage_backoff_s: float = Field(default=2.0, ge=0.0)  # fresh releases only, after a failure


class GatewaySettings(IdentitySettings):
    """Everything the gateway needs beyond the shared Settings and the key ring and roles it
    shares with the accountant (`IdentitySettings`)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDLLM_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    # Identity and tokens (roles, key ring, identifying fields: IdentitySettings).
    users: list[UserRecord] = Field(default_factory=list)
    token_ttl_s: int = Field(default=1800, ge=30, le=86_400)
    # Key for prompt HMACs in audit events; derived from the JWT secret when empty.
    audit_hmac_key: SecretStr = SecretStr("")

    # Rate limits (sliding windows; Redis when REDIS_URL is set, else in-process).
    rate_window_s: int = Field(default=3600, ge=1)
    rate_limit_user: int = Field(default=30, ge=1)
    rate_limit_address: int = Field(default=300, ge=1)
    redis_prefix: str = "fedllm:gw"
    cache: CacheSettings = Field(default_factory=CacheSettings)
    # Terminal results (GET /v1/inference/{id}) and Idempotency-Key bindings are kept this long.
    result_retention_s: int = Field(default=86_400, ge=60)

    # Brute-force lockout on /v1/auth/token.
    lockout_window_s: int = Field(default=900, ge=1)
    lockout_user_failures: int = Field(default=5, ge=1)
    lockout_address_failures: int = Field(default=20, ge=1)

    # TLS for the HTTP listener; mTLS when tls_client_ca is set and mtls_required.
    tls_certfile: str = ""
    tls_keyfile: str = ""
    tls_client_ca: str = ""
    mtls_required: bool = False
    # Addresses whose X-Forwarded-For uvicorn may trust (empty: none).
    forwarded_allow_ips: str = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return layered_sources(
            settings_cls, init_settings, env_settings, file_secret_settings, section="gateway"
        )

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        for user in self.users:
            if user.role not in self.roles:
                raise ValueError(f"user {user.username!r} has unknown role {user.role!r}")
        if self.jwt_kid in self.jwt_previous_keys:
            raise ValueError("jwt_kid must not also be a previous key id")
        if (self.tls_certfile == "") != (self.tls_keyfile == ""):
            raise ValueError("tls_certfile and tls_keyfile go together")
        if self.mtls_required and not (self.tls_client_ca and self.tls_certfile):
            raise ValueError("mtls_required needs tls_certfile, tls_keyfile and tls_client_ca")
        return self

    def prompt_hmac_key(self, settings: Settings) -> bytes:
        """The audit HMAC key: configured, or derived from the JWT secret (never the secret)."""
        return _configured_or_derived(self.audit_hmac_key, settings, b"fedllm-audit-prompt-hmac-v1")

    def cache_secret(self, settings: Settings) -> bytes:
        """The answer-cache key: configured, or derived from the JWT secret (never the secret)."""
        return _configured_or_derived(self.cache.secret, settings, b"fedllm-answer-cache-v1")

    def user(self, username: str) -> UserRecord | None:
        for u in self.users:
            if u.username == username:
                return u
        return None


def _configured_or_derived(configured: SecretStr, settings: Settings, label: bytes) -> bytes:
    """A configured key, or one derived from the JWT secret under `label`."""
    value = configured.get_secret_value()
    if value:
        return value.encode()
    return hmac.new(settings.require_jwt_secret().encode(), label, hashlib.sha256).digest()

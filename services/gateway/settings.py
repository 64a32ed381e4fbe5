"""Gateway-only settings: users, roles, rate limits, lockout, TLS, key rotation.

Read from FEDLLM_GATEWAY_<FIELD> environment variables (nested fields use `__`, lists and
dicts as JSON) over the `gateway:` section of the shared YAML file (FEDLLM_CONFIG) over
defaults. The shared `fedllm.common.config.Settings` keeps the JWT secret, audience and
algorithm; this class adds what only the gateway needs.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fedllm.common.config import PLACEHOLDER_SECRETS, Settings, layered_sources

Permission = Literal[
    "query",  # kind=generate: free-text questions over patient records
    "aggregate",  # kind=aggregate: DP aggregate statistics
    "deidentified_only",  # aggregate queries may not name identifying fields
    "budget.read.self",
    "budget.read.department",
    "budget.read.any",
    "admin",
]


def default_roles() -> dict[str, list[Permission]]:
    """The default RBAC matrix (least privilege; override with FEDLLM_GATEWAY_ROLES)."""
    return {
        "doctor": ["query", "aggregate", "budget.read.self"],
        "nurse": ["query", "budget.read.self"],
        "researcher": ["aggregate", "deidentified_only", "budget.read.self"],
        "admin": ["admin", "budget.read.any", "budget.read.self"],
        "dept_head": ["budget.read.self", "budget.read.department"],
    }


def default_identifying_fields() -> list[str]:
    """Field names a de-identified-only role may not mention in an aggregate query."""
    return [
        "name", "given", "family", "patient_id", "mrn", "identifier", "ssn", "address",
        "line", "postal_code", "zip", "phone", "telecom", "email", "birth_date", "birthdate",
        "dob", "date_of_birth", "narrative", "note", "notes", "text",
    ]


class UserRecord(BaseModel):
    """One account allowed to obtain tokens; the password is stored as an argon2 hash only."""

    username: str = Field(min_length=1, max_length=64)
    password_hash: str = Field(min_length=1)
    department: str
    role: str
    disabled: bool = False

    @field_validator("password_hash")
    @classmethod
    def _argon2_only(cls, v: str) -> str:
        if not v.startswith("$argon2"):
            raise ValueError("password_hash must be an argon2 hash (see `fedllm gateway --hash-password`)")
        return v


class GatewaySettings(BaseSettings):
    """Everything the gateway needs beyond the shared Settings."""

    model_config = SettingsConfigDict(
        env_prefix="FEDLLM_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    # Identity and tokens.
    users: list[UserRecord] = Field(default_factory=list)
    roles: dict[str, list[Permission]] = Field(default_factory=default_roles)
    token_ttl_s: int = Field(default=1800, ge=30, le=86_400)
    jwt_kid: str = Field(default="k1", min_length=1, max_length=64)
    # Older keys still accepted for verification during a rotation: kid -> secret.
    jwt_previous_keys: dict[str, SecretStr] = Field(default_factory=dict)
    jwt_leeway_s: int = Field(default=10, ge=0, le=300)
    # Key for prompt HMACs in audit events; derived from the JWT secret when empty.
    audit_hmac_key: SecretStr = SecretStr("")
    identifying_fields: list[str] = Field(default_factory=default_identifying_fields)

    # Rate limits (sliding windows; Redis when REDIS_URL is set, else in-process).
    rate_window_s: int = Field(default=3600, ge=1)
    rate_limit_user: int = Field(default=30, ge=1)
    rate_limit_address: int = Field(default=300, ge=1)
    redis_prefix: str = "fedllm:gw"
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
        return layered_sources(settings_cls, init_settings, env_settings, file_secret_settings,
                               section="gateway")

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

    def verification_keys(self, settings: Settings) -> dict[str, str]:
        """kid -> secret for every key a token may be signed with (current first)."""
        keys = {self.jwt_kid: settings.require_jwt_secret()}
        for kid, secret in self.jwt_previous_keys.items():
            value = secret.get_secret_value()
            if settings.mode != "demo" and value in PLACEHOLDER_SECRETS:
                raise ValueError(f"previous JWT key {kid!r} is empty or a placeholder")
            keys[kid] = value
        return keys

    def prompt_hmac_key(self, settings: Settings) -> bytes:
        """The audit HMAC key: configured, or derived from the JWT secret (never the secret)."""
        configured = self.audit_hmac_key.get_secret_value()
        if configured:
            return configured.encode()
        secret = settings.require_jwt_secret().encode()
        return hmac.new(secret, b"fedllm-audit-prompt-hmac-v1", hashlib.sha256).digest()

    def user(self, username: str) -> UserRecord | None:
        for u in self.users:
            if u.username == username:
                return u
        return None

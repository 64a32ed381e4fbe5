"""Auditor settings (pydantic-settings, env `FEDLLM_AUDIT_*` over defaults)."""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# 45 CFR 164.316(b)(2)(i): six years; 6 × 365.25 days, rounded up.
SIX_YEARS_DAYS = 2192


class AuditorSettings(BaseSettings):
    """What only the auditor reads. Secrets have no default; an empty key means 'not configured'."""

    model_config = SettingsConfigDict(env_prefix="FEDLLM_AUDIT_", extra="ignore")

    encryption_key: SecretStr = SecretStr("")  # base64 of 32 bytes (AES-256-GCM)
    key_id: str = ""  # defaults to a fingerprint of the key
    hmac_key: SecretStr = SecretStr("")  # for clear text met in details; else derived from key
    retention_days: int = SIX_YEARS_DAYS + 1
    chain_by: Literal["main", "hospital"] = "main"
    group_id: str = "auditor"
    batch_max: int = 500
    batch_wait_ms: int = 100
    retry_initial_s: float = 0.2
    retry_max_s: float = 5.0

    @field_validator("encryption_key")
    @classmethod
    def _key_is_32_bytes(cls, v: SecretStr) -> SecretStr:
        raw = v.get_secret_value()
        if raw:
            try:
                key = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("FEDLLM_AUDIT_ENCRYPTION_KEY is not base64") from exc
            if len(key) != 32:
                raise ValueError("FEDLLM_AUDIT_ENCRYPTION_KEY must decode to 32 bytes")
        return v

    def encryption_key_bytes(self) -> bytes | None:
        raw = self.encryption_key.get_secret_value()
        return base64.b64decode(raw) if raw else None

    def resolved_key_id(self) -> str:
        """The configured key id, or the first 16 hex digits of SHA-256(key)."""
        key = self.encryption_key_bytes()
        if self.key_id or key is None:
            return self.key_id
        return hashlib.sha256(key).hexdigest()[:16]

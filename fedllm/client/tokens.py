"""Tokens minted on this machine with the deployment's JWT secret (JWT_SECRET; the public demo
secret in demo mode, i.e. under `fedllm up`). Real users obtain theirs from the gateway
(POST /v1/auth/token, `HttpClient.login`)."""

from __future__ import annotations

import os
from typing import Literal, cast

from fedllm.common.config import Settings
from fedllm.common.identity import mint_token


def local_token(
    user: str, *, role: str = "doctor", department: str = "general", ttl_s: int = 1800
) -> str:
    """A bearer token for `user`; FEDLLM_MODE defaults to demo here."""
    mode = cast(Literal["demo", "prod"], os.environ.get("FEDLLM_MODE", "demo"))  # validated
    settings = Settings(mode=mode)
    return mint_token(settings, user_id=user, role=role, department=department, ttl_s=ttl_s)

"""Minting bearer tokens (HS-family JWT, pinned algorithm, `kid` header)."""

from __future__ import annotations

import time
import uuid

import jwt

from fedllm.common.config import Settings

ISSUER = "fedllm-gateway"


def mint_token(
    settings: Settings,
    *,
    user_id: str,
    department: str,
    role: str,
    ttl_s: int = 1800,
    kid: str | None = None,
    secret: str | None = None,
) -> str:
    """A signed token for `user_id`; `kid`/`secret` default to the gateway's current key."""
    if kid is None:
        from services.gateway.settings import GatewaySettings

        kid = GatewaySettings().jwt_kid
    now = int(time.time())
    claims = {
        "sub": user_id,
        "department": department,
        "role": role,
        "aud": settings.jwt_audience,
        "iss": ISSUER,
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_s),
        "jti": uuid.uuid4().hex,
    }
    key = secret if secret is not None else settings.require_jwt_secret()
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm, headers={"kid": kid})

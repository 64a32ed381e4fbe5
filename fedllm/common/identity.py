"""Who is asking: bearer-JWT verification and minting, shared by every service that takes a
credential (the gateway over HTTP, the accountant over Kafka) so both apply the same rules:
algorithm pinned, `kid` key ring, audience, expiry/not-before, identity only from claims.

The key ring and the role -> permission matrix are read from the `gateway:` settings
(FEDLLM_GATEWAY_JWT_KID, FEDLLM_GATEWAY_JWT_PREVIOUS_KEYS, FEDLLM_GATEWAY_ROLES, ...): one
configuration, whichever service verifies.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fedllm.common.config import PLACEHOLDER_SECRETS, Settings, layered_sources

ALLOWED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
REQUIRED_CLAIMS = ("sub", "aud", "exp", "role", "department")
ISSUER = "fedllm-gateway"
# The Kafka header a request event carries its credential in: b"Bearer <jwt>".
CREDENTIAL_HEADER = "authorization"

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
        "name",
        "given",
        "family",
        "patient_id",
        "mrn",
        "identifier",
        "ssn",
        "address",
        "line",
        "postal_code",
        "zip",
        "phone",
        "telecom",
        "email",
        "birth_date",
        "birthdate",
        "dob",
        "date_of_birth",
        "narrative",
        "note",
        "notes",
        "text",
    ]


class AuthError(Exception):
    """A token or credential that must be refused; `reason` is safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller."""

    user_id: str
    department: str
    role: str
    permissions: frozenset[str]
    regions: tuple[str, ...] = ()  # empty: the department's regions (data residency)

    def can(self, permission: str) -> bool:
        return permission in self.permissions


class TokenVerifier:
    """Checks signature (by `kid`), algorithm, audience, expiry, not-before and claim shapes."""

    def __init__(
        self,
        *,
        keys: dict[str, str],
        current_kid: str,
        algorithm: str,
        audience: str,
        roles: dict[str, list[str]] | dict[str, list[Permission]],
        leeway_s: int = 10,
    ) -> None:
        if algorithm not in ALLOWED_ALGORITHMS:
            raise ValueError(
                f"JWT algorithm {algorithm!r} is not allowed; use one of "
                f"{sorted(ALLOWED_ALGORITHMS)}"
            )
        if current_kid not in keys:
            raise ValueError("the current key id has no key")
        self.keys = dict(keys)
        self.current_kid = current_kid
        self.algorithm = algorithm
        self.audience = audience
        self.roles = {r: frozenset(p) for r, p in roles.items()}
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        if header.get("alg") != self.algorithm:
            raise AuthError("token algorithm not accepted")
        kid = header.get("kid", self.current_kid)
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("unknown signing key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self.algorithm],
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim}") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        sub, role, dept = claims.get("sub"), claims.get("role"), claims.get("department")
        if not all(isinstance(v, str) and v and len(v) <= 128 for v in (sub, role, dept)):
            raise AuthError("malformed identity claims")
        assert isinstance(sub, str) and isinstance(role, str) and isinstance(dept, str)
        perms = self.roles.get(role)
        if perms is None:
            raise AuthError("unknown role")
        regions = claims.get("regions", [])
        if not (
            isinstance(regions, list)
            and len(regions) <= 16
            and all(isinstance(r, str) and 0 < len(r) <= 32 for r in regions)
        ):
            raise AuthError("malformed regions claim")
        return Principal(
            user_id=sub, department=dept, role=role, permissions=perms, regions=tuple(regions)
        )


class IdentitySettings(BaseSettings):
    """The key ring and RBAC matrix (the `gateway:` section; FEDLLM_GATEWAY_<FIELD>)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDLLM_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    roles: dict[str, list[Permission]] = Field(default_factory=default_roles)
    jwt_kid: str = Field(default="k1", min_length=1, max_length=64)
    # Older keys still accepted for verification during a rotation: kid -> secret.
    jwt_previous_keys: dict[str, SecretStr] = Field(default_factory=dict)
    jwt_leeway_s: int = Field(default=10, ge=0, le=300)
    identifying_fields: list[str] = Field(default_factory=default_identifying_fields)

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

    def verification_keys(self, settings: Settings) -> dict[str, str]:
        """kid -> secret for every key a token may be signed with (current first)."""
        keys = {self.jwt_kid: settings.require_jwt_secret()}
        for kid, secret in self.jwt_previous_keys.items():
            value = secret.get_secret_value()
            if settings.mode != "demo" and value in PLACEHOLDER_SECRETS:
                raise ValueError(f"previous JWT key {kid!r} is empty or a placeholder")
            keys[kid] = value
        return keys

    def verifier(self, settings: Settings) -> TokenVerifier:
        """The TokenVerifier every service builds from the same configuration."""
        return TokenVerifier(
            keys=self.verification_keys(settings),
            current_kid=self.jwt_kid,
            algorithm=settings.jwt_algorithm,
            audience=settings.jwt_audience,
            roles=self.roles,
            leeway_s=self.jwt_leeway_s,
        )


def mint_token(
    settings: Settings,
    *,
    user_id: str,
    department: str,
    role: str,
    ttl_s: int = 1800,
    kid: str | None = None,
    secret: str | None = None,
    regions: Sequence[str] = (),
) -> str:
    """A signed token for `user_id`; `kid`/`secret` default to the current key; `regions`
    (optional claim) narrows where the user's requests may be routed."""
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
    if regions:
        claims["regions"] = list(regions)
    key = secret if secret is not None else settings.require_jwt_secret()
    kid = kid if kid is not None else IdentitySettings().jwt_kid
    return jwt.encode(claims, key, algorithm=settings.jwt_algorithm, headers={"kid": kid})


def bearer_from_headers(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    """The token of the event's credential header (`Bearer <jwt>`), or None when absent."""
    for name, value in headers or ():
        if name.lower() == CREDENTIAL_HEADER and isinstance(value, bytes):
            text = value.decode("ascii", "replace").strip()
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


_WORD = re.compile(r"[A-Za-z0-9_]+")


def identifying_terms(value: Any, banned: set[str]) -> set[str]:
    """Identifying field names mentioned anywhere (keys or string values) in a JSON value."""
    found: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                found |= {w for w in _WORD.findall(str(k)) if w.lower() in banned}
                stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            found |= {w for w in _WORD.findall(v) if w.lower() in banned}
    return found


def refusal_for(
    principal: Principal,
    *,
    kind: str,
    prompt: str,
    department: str,
    identifying_fields: Sequence[str],
) -> str:
    """Why `principal` may not run this query ("" when it may): the role's permission for the
    kind, the caller's own department only, de-identified fields for de-identified roles."""
    needed = "query" if kind == "generate" else "aggregate"
    if kind not in ("generate", "aggregate") or not principal.can(needed):
        return f"role {principal.role!r} may not run {kind} queries"
    if department != principal.department:
        return "queries may only be made for the caller's own department"
    if kind == "aggregate" and principal.can("deidentified_only"):
        try:
            query = json.loads(prompt)
        except ValueError:
            return "an aggregate prompt must be a JSON object"
        named = identifying_terms(query, {f.lower() for f in identifying_fields})
        if named:
            return "role may only use de-identified fields; query names " + ", ".join(sorted(named))
    return ""

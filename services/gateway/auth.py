"""Identity: verifying bearer JWTs (pinned algorithm, key ids, rotation) and passwords."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ALLOWED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
REQUIRED_CLAIMS = ("sub", "aud", "exp", "role", "department")


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
        roles: dict[str, list[str]],
        leeway_s: int = 10,
    ) -> None:
        if algorithm not in ALLOWED_ALGORITHMS:
            raise ValueError(f"JWT algorithm {algorithm!r} is not allowed; use one of "
                             f"{sorted(ALLOWED_ALGORITHMS)}")
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
        perms = self.roles.get(role)
        if perms is None:
            raise AuthError("unknown role")
        return Principal(user_id=sub, department=dept, role=role, permissions=perms)


class PasswordChecker:
    """argon2 verification that costs as much for an unknown user as for a known one: the
    stand-in hash for unknown users uses the parameters of the configured users' hashes."""

    def __init__(self, *, like: str | None = None) -> None:
        self.hasher = PasswordHasher()
        self._like = like
        self._dummy: str | None = None

    def hash(self, password: str) -> str:
        return self.hasher.hash(password)

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            hasher = self.hasher
            if self._like:
                try:
                    hasher = PasswordHasher.from_parameters(extract_parameters(self._like))
                except (InvalidHashError, ValueError):
                    pass
            self._dummy = hasher.hash(secrets.token_urlsafe(16))
        return self._dummy

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            ok = self.hasher.verify(password_hash or self._dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return bool(ok and password_hash)

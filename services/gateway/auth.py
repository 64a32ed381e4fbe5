"""Identity: bearer JWTs (verified by `fedllm.common.identity`, shared with the accountant)
and passwords."""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fedllm.common.identity import (  # noqa: F401 - re-exported for the gateway's modules
    ALLOWED_ALGORITHMS,
    REQUIRED_CLAIMS,
    AuthError,
    Principal,
    TokenVerifier,
)


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

from __future__ import annotations

import uuid

import pytest
from argon2 import PasswordHasher

from fedllm.common.config import Settings
from fedllm.services.gateway.auth import PasswordChecker
from fedllm.services.gateway.settings import GatewaySettings, UserRecord
from tests.gateway.peers import make_settings, prepare_topics

PASSWORDS = {
    "dr_grey": ("cardiology", "doctor", "correct horse battery staple"),
    "nurse_joy": ("emergency", "nurse", "n0t-the-same-pass!"),
    "res_lee": ("research", "researcher", "r3search-only-pass"),
    "root": ("admin", "admin", "admin-pass-long-enough"),
}


@pytest.fixture(scope="session")
async def settings(kafka_bootstrap: str) -> Settings:
    s = make_settings(kafka_bootstrap)
    await prepare_topics(s)
    return s


@pytest.fixture(scope="session")
def users() -> list[UserRecord]:
    # Cheap argon2 parameters keep the suite fast; production hashes use argon2's defaults.
    checker = PasswordChecker()
    checker.hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    return [
        UserRecord(username=u, department=d, role=r, password_hash=checker.hash(p))
        for u, (d, r, p) in PASSWORDS.items()
    ]


@pytest.fixture
def gw(users) -> GatewaySettings:
    """Gateway settings with test users and a fresh key prefix (no cross-test counters)."""
    return GatewaySettings(users=users, redis_prefix=f"fedllm:test:{uuid.uuid4().hex[:8]}")

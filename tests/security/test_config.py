"""Gateway settings from YAML/env; the CLI's password hashing; argon2-only user records."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from fedllm.services.gateway import cli
from fedllm.services.gateway.auth import PasswordChecker
from fedllm.services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

HASH = PasswordChecker().hash("pw")


async def test_yaml_gateway_section_and_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "fedllm.yaml"
    cfg.write_text(
        "mode: prod\n"
        "gateway:\n"
        "  rate_limit_user: 7\n"
        "  users:\n"
        f"    - {{username: a, department: general, role: nurse, password_hash: '{HASH}'}}\n"
    )
    monkeypatch.setenv("FEDLLM_CONFIG", str(cfg))
    gw = GatewaySettings()
    assert gw.rate_limit_user == 7 and gw.user("a").role == "nurse"
    monkeypatch.setenv("FEDLLM_GATEWAY_RATE_LIMIT_USER", "9")
    assert GatewaySettings().rate_limit_user == 9


async def test_users_from_env_json(monkeypatch):
    monkeypatch.setenv(
        "FEDLLM_GATEWAY_USERS",
        json.dumps(
            [{"username": "b", "department": "general", "role": "doctor", "password_hash": HASH}]
        ),
    )
    assert GatewaySettings().user("b").department == "general"


@pytest.mark.parametrize(
    "bad",
    [
        {"password_hash": "plaintext"},
        {"password_hash": "$2b$12$bcrypt-is-not-accepted"},
        {"role": "wizard"},
    ],
)
async def test_bad_user_records_are_refused(bad):
    user = {"username": "c", "department": "general", "role": "doctor", "password_hash": HASH}
    with pytest.raises(ValueError):
        GatewaySettings(users=[{**user, **bad}])


@pytest.mark.slow  # four argon2 operations at the production cost
async def test_cli_hashes_a_password(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["gateway", "--hash-password"])
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert args.func(args) == 0
    hashed = capsys.readouterr().out.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordChecker().verify(hashed, "s3cret")
    assert not PasswordChecker().verify(hashed, "other")
    assert not PasswordChecker().verify(None, "s3cret")

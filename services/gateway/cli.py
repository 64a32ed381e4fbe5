"""`fedllm gateway`: serve the HTTP gateway (and `--hash-password` for user config)."""

from __future__ import annotations

import argparse
import getpass
import sys

from fedllm.common.config import Settings
from fedllm.common.lifecycle import run_until_signalled, setup_logging


def _main(args: argparse.Namespace) -> int:
    if args.hash_password:
        from services.gateway.auth import PasswordChecker

        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else (
            getpass.getpass("password: "))
        sys.stdout.write(PasswordChecker().hash(password) + "\n")
        return 0
    from services.gateway.service import run

    settings = Settings()
    setup_logging("gateway")
    settings.require_jwt_secret()
    run_until_signalled(lambda stop: run(settings, stop=stop))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("gateway", help="serve the HTTP gateway")
    parser.add_argument("--hash-password", action="store_true",
                        help="read a password from stdin and print its argon2 hash")
    parser.set_defaults(func=_main)

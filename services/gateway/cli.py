"""`fedllm gateway`: serve the HTTP gateway (and `--hash-password` for user config)."""

from __future__ import annotations

import argparse
import getpass
import sys

from fedllm.common.config import Settings
from fedllm.common.lifecycle import run_until_signalled, setup_logging


def _main(args: argparse.Namespace) -> int:
    if args.hash_password:
        from fedllm.services.gateway.auth import PasswordChecker

        password = (
            sys.stdin.readline().rstrip("\n")
            if not sys.stdin.isatty()
            else (getpass.getpass("password: "))
        )
        sys.stdout.write(PasswordChecker().hash(password) + "\n")
        return 0
    from fedllm.services.gateway.service import run

    settings = Settings()
    setup_logging("gateway")
    settings.require_jwt_secret()
    run_until_signalled(lambda stop: run(settings, stop=stop))
    return 0


def _retire(args: argparse.Namespace) -> int:
    """Delete the cached releases of the named hospitals (after an erasure or a data reload)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from fedllm.services.gateway.cached_answers import make_answer_cache
    from fedllm.services.gateway.settings import GatewaySettings

    settings = Settings()
    cache = make_answer_cache(settings, GatewaySettings(), CollectorRegistry())
    if cache is None:
        sys.stderr.write("answer cache is off (no Redis URL, or disabled)\n")
        return 1

    async def retire() -> list[int]:
        try:
            return [await cache.retire(h) for h in args.hospital]
        finally:
            await cache.close()

    for hospital, n in zip(args.hospital, asyncio.run(retire()), strict=True):
        sys.stdout.write(f"{hospital}: {n} cached releases retired\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("gateway", help="serve the HTTP gateway")
    parser.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password from stdin and print its argon2 hash",
    )
    parser.set_defaults(func=_main)
    cache = sub.add_parser("cache", help="the gateway's DP answer cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    retire = cache_sub.add_parser(
        "retire", help="retire a hospital's cached releases (run after an erasure or new data)"
    )
    retire.add_argument(
        "--hospital", action="append", required=True, help="hospital id (repeatable)"
    )
    retire.set_defaults(func=_retire)

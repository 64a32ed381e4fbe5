"""`fedllm router`: run the router service until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio

from fedllm.common.config import Settings
from fedllm.common.lifecycle import run_until_signalled, setup_logging
from fedllm.common.metrics import serve_metrics


def _router(args: argparse.Namespace) -> int:
    from fedllm.services.router import service

    settings = Settings()
    setup_logging("router")
    serve_metrics(settings, "router")

    async def main(stop: asyncio.Event) -> None:
        await service.run(settings, stop=stop)

    run_until_signalled(main)
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `router` subcommand."""
    parser = sub.add_parser("router", help="route approved requests to hospital nodes")
    parser.set_defaults(func=_router)

"""Process lifecycle shared by the services: logging, signal handling, readiness markers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from fedllm.common.config import Settings


def setup_logging(service: str) -> None:
    """JSON log lines (fedllm.common.logs; FEDLLM_LOG_FORMAT=text for plain lines); never log
    prompts, answers or tokens."""
    from fedllm.common.logs import JsonFormatter

    handler = logging.StreamHandler()
    if os.environ.get("FEDLLM_LOG_FORMAT", "json") == "text":
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
        )
    else:
        handler.setFormatter(JsonFormatter(service))
    logging.basicConfig(level=os.environ.get("FEDLLM_LOG_LEVEL", "INFO"), handlers=[handler])
    from fedllm.common import tracing

    tracing.setup(service)  # trace context across the hops; OTLP export only when configured
    # aiokafka logs whole message values (prompts, answers) at DEBUG: never let it.
    logging.getLogger("aiokafka").setLevel(max(logging.INFO, logging.root.level))


def ready_path(settings: Settings, name: str) -> Path:
    return settings.data_dir / "run" / f"{name}.ready"


def mark_ready(settings: Settings, name: str) -> None:
    """Write `<data_dir>/run/<name>.ready` once the service's consumers hold their assignments."""
    path = ready_path(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def clear_ready(settings: Settings, name: str) -> None:
    ready_path(settings, name).unlink(missing_ok=True)


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` on a fresh loop; SIGTERM/SIGINT set `stop`."""

    async def _runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(_runner())

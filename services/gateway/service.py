"""Serving the gateway: uvicorn on gateway_host:gateway_port, HTTPS/mTLS when configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, cast

import uvicorn

from fedllm.common.config import Settings
from fedllm.common.lifecycle import clear_ready, mark_ready
from fedllm.services.gateway.app import create_app, is_ready
from fedllm.services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


def tls_options(gw: GatewaySettings) -> dict[str, Any]:
    """uvicorn keyword arguments for HTTPS (and client-certificate checks when mTLS is on)."""
    if not gw.tls_certfile:
        return {}
    opts: dict[str, Any] = {"ssl_certfile": gw.tls_certfile, "ssl_keyfile": gw.tls_keyfile}
    if gw.tls_client_ca:
        opts["ssl_ca_certs"] = gw.tls_client_ca
        opts["ssl_cert_reqs"] = ssl.CERT_REQUIRED if gw.mtls_required else ssl.CERT_OPTIONAL
    return opts


def make_server(
    settings: Settings,
    *,
    gateway_settings: GatewaySettings | None = None,
    host: str | None = None,
    port: int | None = None,
    **app_kw: Any,
) -> uvicorn.Server:
    """A uvicorn server for a fresh gateway app (not started)."""
    gw = gateway_settings if gateway_settings is not None else GatewaySettings()
    app = create_app(settings, gateway_settings=gw, **app_kw)
    config = uvicorn.Config(
        app,
        host=host or settings.gateway_host,
        port=port if port is not None else settings.gateway_port,
        lifespan="on",
        log_config=None,  # keep the process's logging setup
        access_log=False,  # the metrics middleware counts requests; no paths/bodies in logs
        server_header=False,
        proxy_headers=bool(gw.forwarded_allow_ips),
        forwarded_allow_ips=gw.forwarded_allow_ips or None,
        timeout_graceful_shutdown=5,
        **tls_options(gw),
    )
    return uvicorn.Server(config)


async def run(
    settings: Settings, *, stop: asyncio.Event, gateway_settings: GatewaySettings | None = None
) -> None:
    """Serve until `stop` is set; writes the readiness marker once consumers are assigned."""
    settings.require_jwt_secret()  # refuse a placeholder secret before opening a port
    server = make_server(settings, gateway_settings=gateway_settings)
    serving = asyncio.create_task(server.serve(), name="gateway-http")

    async def watch_ready() -> None:
        while not server.started:
            if serving.done():
                return
            await asyncio.sleep(0.05)
        state = cast(Any, server.config.app).state.gateway
        while not (await is_ready(state)).ready:
            await asyncio.sleep(0.2)
        mark_ready(settings, "gateway")
        log.info(
            "gateway ready on %s:%d (tls=%s)",
            server.config.host,
            server.config.port,
            bool(server.config.ssl_certfile),
        )

    readiness = asyncio.create_task(watch_ready(), name="gateway-ready")
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        readiness.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readiness
        await serving
        clear_ready(settings, "gateway")

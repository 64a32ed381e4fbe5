"""Kafka over TLS/mTLS. The local Tansu broker cannot serve TLS, so what is tested here is our
side of it: the client context every service uses (common.kafka.ssl_context) against a real TLS
listener that demands a client certificate from the dev CA, as a Kafka SSL listener with
`ssl.client.auth=required` would."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import faust
import pytest

from fedllm.common.config import Settings
from fedllm.common.kafka import make_producer, ssl_context
from fedllm.services.accountant.service import create_app
from tests.security.test_tls import load_gen_dev_certs


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    gen = load_gen_dev_certs()
    good = gen.generate(tmp_path_factory.mktemp("kafka-pki"), hospitals=("st_mary", "northside"))
    rogue = gen.generate(tmp_path_factory.mktemp("kafka-rogue"), hospitals=())
    good["rogue-ca"] = rogue["ca"]
    return good


async def mtls_listener(certs: dict[str, Path]) -> tuple[asyncio.Server, int, list[str]]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs["ca"]))
    server_ctx.load_cert_chain(str(certs["server"]), str(certs["server_key"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    peers: list[str] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert = writer.get_extra_info("peercert")
        peers.append(dict(x[0] for x in cert["subject"])["commonName"])
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    return server, server.sockets[0].getsockname()[1], peers


def tls_settings(certs: dict[str, Path], client: str | None) -> Settings:
    kw = {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": str(certs["ca"])}
    if client:
        kw.update(
            kafka_ssl_certfile=str(certs[client]), kafka_ssl_keyfile=str(certs[client + "-key"])
        )
    return Settings(**kw)


async def handshake(ctx: ssl.SSLContext, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        return await asyncio.wait_for(reader.read(2), 5)
    finally:
        writer.close()


def test_plaintext_has_no_context() -> None:
    assert ssl_context(Settings()) is None


@pytest.mark.asyncio(loop_scope="session")
async def test_hospital_client_certificate_is_presented(pki: dict[str, Path]) -> None:
    server, port, peers = await mtls_listener(pki)
    async with server:
        ctx = ssl_context(tls_settings(pki, "client-st_mary"))
        assert await handshake(ctx, port) == b"ok"
    assert peers == ["st_mary"]


@pytest.mark.asyncio(loop_scope="session")
async def test_listener_refuses_client_without_certificate(pki: dict[str, Path]) -> None:
    server, port, peers = await mtls_listener(pki)
    async with server:
        ctx = ssl_context(tls_settings(pki, None))
        try:  # TLS 1.3 reports the server's refusal only as a closed stream
            got = await handshake(ctx, port)
        except (ssl.SSLError, ConnectionError):
            got = b""
        assert got == b""
    assert peers == []


@pytest.mark.asyncio(loop_scope="session")
async def test_client_refuses_server_from_another_ca(pki: dict[str, Path]) -> None:
    server, port, _ = await mtls_listener(pki)
    async with server:
        rogue_ca = dict(pki, ca=pki["rogue-ca"])  # trust a different CA
        ctx = ssl_context(tls_settings(rogue_ca, "client-st_mary"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(ctx, port)


@pytest.mark.asyncio(loop_scope="session")
async def test_every_kafka_client_gets_the_context(pki: dict[str, Path]) -> None:
    settings = tls_settings(pki, "client-northside")
    producer = make_producer(settings)
    assert producer.client._security_protocol == "SSL"
    assert producer.client._ssl_context is not None
    app = create_app(settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:9093"}))
    assert isinstance(app.conf.broker_credentials, faust.SSLCredentials)

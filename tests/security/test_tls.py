"""HTTPS with the dev certificates, and mTLS refusing clients without a valid certificate."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ssl
from pathlib import Path

import httpx
import pytest

from fedllm.embedded import free_port
from fedllm.services.gateway.service import make_server
from fedllm.services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]


def load_gen_dev_certs():
    spec = importlib.util.spec_from_file_location(
        "gen_dev_certs", ROOT / "scripts" / "gen_dev_certs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    gen = load_gen_dev_certs()
    good = gen.generate(tmp_path_factory.mktemp("pki"), hospitals=("st_mary", "northside"))
    rogue = gen.generate(tmp_path_factory.mktemp("rogue"), hospitals=("st_mary",))
    good["rogue-client"] = rogue["client-st_mary"]
    good["rogue-client-key"] = rogue["client-st_mary-key"]
    good["rogue-server"] = rogue["server"]
    good["rogue-server-key"] = rogue["server_key"]
    return good


@contextlib.asynccontextmanager
async def tls_gateway(settings, gw: GatewaySettings):
    port = free_port()
    server = make_server(settings, gateway_settings=gw, host="127.0.0.1", port=port)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started or task.done():
                break
            await asyncio.sleep(0.05)
        assert server.started
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 20)


def client_ctx(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def test_generated_certificates_have_the_right_shape(certs):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    server = x509.load_pem_x509_certificate(certs["server"].read_bytes())
    client = x509.load_pem_x509_certificate(certs["client-st_mary"].read_bytes())
    ca = x509.load_pem_x509_certificate(certs["ca"].read_bytes())
    assert server.issuer == ca.subject == client.issuer
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "st_mary"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert oct(certs["server_key"].stat().st_mode)[-3:] == "600"


async def test_https_serves_and_plain_http_does_not(settings, certs):
    gw = GatewaySettings(tls_certfile=str(certs["server"]), tls_keyfile=str(certs["server_key"]))
    async with tls_gateway(settings, gw) as url:
        async with httpx.AsyncClient(verify=client_ctx(certs["ca"])) as c:
            r = await c.get(f"{url}/v1/health")
            assert r.status_code == 200
        # A client that does not trust the dev CA refuses the server.
        async with httpx.AsyncClient(
            verify=client_ctx(certs["rogue-server"].with_name("ca.pem"))
        ) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"{url}/v1/health")
        async with httpx.AsyncClient() as c:
            with pytest.raises(httpx.HTTPError):
                await c.get(url.replace("https", "http") + "/v1/health")


async def test_mtls_requires_a_client_certificate_from_the_ca(settings, certs):
    gw = GatewaySettings(
        tls_certfile=str(certs["server"]),
        tls_keyfile=str(certs["server_key"]),
        tls_client_ca=str(certs["ca"]),
        mtls_required=True,
    )
    async with tls_gateway(settings, gw) as url:
        good = client_ctx(certs["ca"], certs["client-st_mary"], certs["client-st_mary-key"])
        async with httpx.AsyncClient(verify=good) as c:
            assert (await c.get(f"{url}/v1/health")).status_code == 200
        for ctx in (
            client_ctx(certs["ca"]),  # no client certificate
            client_ctx(certs["ca"], certs["rogue-client"], certs["rogue-client-key"]),
        ):
            async with httpx.AsyncClient(verify=ctx) as c:
                with pytest.raises(
                    (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)
                ):
                    await c.get(f"{url}/v1/health")


async def test_mtls_without_a_ca_is_a_config_error():
    with pytest.raises(ValueError, match="mtls_required"):
        GatewaySettings(tls_certfile="a.pem", tls_keyfile="a.key", mtls_required=True)
    with pytest.raises(ValueError, match="go together"):
        GatewaySettings(tls_certfile="a.pem")

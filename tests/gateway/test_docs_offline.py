"""/docs and /redoc load everything from the gateway itself: no external URL, assets served."""

from __future__ import annotations

import re

import httpx
import pytest

from fedllm.services.gateway.app import create_app
from tests.gateway.peers import make_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""")


def _client() -> httpx.AsyncClient:
    # No lifespan: the docs need no broker.
    app = create_app(make_settings("127.0.0.1:1"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_reference_only_the_gateway(page: str) -> None:
    async with _client() as client:
        html = (await client.get(page)).text
        assert "cdn.jsdelivr.net" not in html and "fonts.googleapis" not in html
        urls = [a or b for a, b in _URL.findall(html)]
        assert urls, f"{page} references no asset at all: {html[:300]}"
        for url in urls:
            assert not re.match(r"^(https?:)?//", url), f"{page} loads {url} from outside"
        scripts = [u for u in urls if u.endswith(".js")]
        assert scripts
        for url in urls:
            if url.endswith((".js", ".css", ".png")):
                response = await client.get(url)
                assert response.status_code == 200, url
                assert len(response.content) > 100, url


async def test_openapi_still_served() -> None:
    async with _client() as client:
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/inference" in spec["paths"]

"""A 405 lists every method of the path, also when two routers serve it."""

from __future__ import annotations

import httpx
import pytest

from fedllm.services.gateway.app import create_app
from tests.gateway.peers import make_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize(
    ("path", "allow"),
    [("/v1/admin/nodes", "GET, POST"), ("/v1/admin/config", "GET, PUT"), ("/v1/health", "GET")],
)
async def test_405_allow_lists_every_method(path: str, allow: str) -> None:
    app = create_app(make_settings("127.0.0.1:1"))  # no lifespan: no broker needed
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        response = await client.request("OPTIONS", path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"detail": "Method Not Allowed"}

from __future__ import annotations

import pytest

from fedllm.common.config import Settings
from tests.gateway.peers import make_settings, prepare_topics


@pytest.fixture(scope="session")
async def settings(kafka_bootstrap: str) -> Settings:
    s = make_settings(kafka_bootstrap)
    await prepare_topics(s)
    return s

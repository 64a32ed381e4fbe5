"""The fast-fetch faust transport: the worker consumer takes its fetch wait from config."""

from __future__ import annotations

import faust
import pytest

from fedllm.common import config
from fedllm.common.faust_transport import (
    FastFetchConsumerThread,
    Transport,
    broker_urls,
)


@pytest.fixture
def fetch_wait(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("FEDLLM_FETCH_MAX_WAIT_MS", "7")
    config.get_settings.cache_clear()
    yield 7
    config.get_settings.cache_clear()


def test_scheme_resolves_to_our_transport() -> None:
    app = faust.App("t-scheme", broker=broker_urls("127.0.0.1:1,127.0.0.2:2"))
    assert isinstance(app.transport, Transport)
    assert [str(u) for u in app.conf.broker] == [
        "fastfetch://127.0.0.1:1",
        "fastfetch://127.0.0.2:2",
    ]


async def test_worker_consumer_uses_configured_fetch_wait(fetch_wait: int) -> None:
    app = faust.App("t-wait", broker="fastfetch://127.0.0.1:1")
    thread = app.consumer._thread
    assert isinstance(thread, FastFetchConsumerThread)
    consumer = thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == fetch_wait != 1500
    await consumer.stop()

"""A faust transport whose worker consumer uses the configured fetch wait.

faust-streaming hard-codes `fetch_max_wait_ms=1500` for its worker consumer. On brokers that do
not wake a waiting fetch when data arrives (the local Tansu broker), that costs ~750 ms a hop.
This transport is faust's aiokafka driver with that one value taken from config
(`Settings.fetch_max_wait_ms`). It is registered as the `fastfetch://` URL scheme through the
`faust.transports` entry point. Its fetch wait lengthens while idle (`fedllm.common.fetch_wait`).
"""

from __future__ import annotations

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

from fedllm.common import fetch_wait
from fedllm.common.config import get_settings

SCHEME = "fastfetch"


def broker_urls(bootstrap: str) -> list[str]:
    """faust broker URLs for a comma-separated bootstrap list, using this transport."""
    return [f"{SCHEME}://{h.strip()}" for h in bootstrap.split(",") if h.strip()]


class FastFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's consumer thread with `fetch_max_wait_ms` from settings."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        settings = get_settings()
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = settings.fetch_max_wait_ms
        start = consumer.start

        async def start_then_adapt() -> None:  # longer waits while idle (fetch_wait)
            await start()
            fetch_wait.adapt_to(consumer, settings)

        consumer.start = start_then_adapt
        return consumer


class FastFetchConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> FastFetchConsumerThread:
        return FastFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    """faust's aiokafka transport with the fast-fetch consumer."""

    Consumer = FastFetchConsumer

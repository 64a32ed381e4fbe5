"""`Pipeline.start` returns once every node is routable: its healthy heartbeat is on the topic
(launcher.nodes_routable), on the real broker."""

from __future__ import annotations

import time

import pytest

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import ensure_topics
from fedllm.launcher import nodes_routable
from tests.kafka_helpers import produce, unique_namespace


def heartbeat(hospital_id: str, *, healthy: bool, sent_at_ms: int) -> dict:
    return {
        "hospital_id": hospital_id,
        "departments": ["cardiology"],
        "queue_depth": 0,
        "in_flight": 0,
        "recent_latency_ms": 5.0,
        "model": "loading" if not healthy else "m",
        "device": "cpu",
        "healthy": healthy,
        "sent_at_ms": sent_at_ms,
    }


async def test_waits_for_a_fresh_healthy_heartbeat_from_every_node(kafka_bootstrap: str) -> None:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_namespace=unique_namespace(),
        background_fetch_max_wait_ms=10,
    )
    await ensure_topics(settings, topics.all_topics([]))
    since = int(time.time() * 1000)
    beats = [
        heartbeat("a", healthy=True, sent_at_ms=since + 1),
        heartbeat("b", healthy=False, sent_at_ms=since + 1),  # still loading its model
        heartbeat("c", healthy=True, sent_at_ms=since - 60_000),  # from before this start
    ]
    for beat in beats:
        await produce(settings, topics.HEARTBEATS, "NodeHeartbeat", beat, key=beat["hospital_id"])

    await nodes_routable(settings, ["a"], since_ms=since, timeout_s=20)
    for missing in ("b", "c"):
        with pytest.raises(TimeoutError, match=rf"\['{missing}'\]"):
            await nodes_routable(settings, ["a", missing], since_ms=since, timeout_s=1.5)

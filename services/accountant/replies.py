"""Answers for Kafka clients: every terminal result is copied to its owner's reply topic.

`fedllm.results` is read only by gateways (ACL); a Kafka client reads
`fedllm.replies.<user_id>` (`fedllm.common.topics.reply_topic`), which an ACL lets only that
user read, so a client never sees anyone else's answers. The copy is made only when that topic
exists (created by the client library before it sends its request, or provisioned by an
operator), so users who only use HTTP cost nothing but a look-up. The owner is the result's
`user_id`, which the accountant took from the verified credential; results refused before any
identity was established are not copied.

A topic found is remembered; a topic not found is asked about again with the next batch that
needs it (a client may create it at any time), by name: one metadata request per batch, whose
cost does not grow with the number of topics on the cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, admin_client, existing_topics
from fedllm.schemas.records import InferenceResult

log = logging.getLogger(__name__)


class ReplyRelay:
    """Copies terminal results to the owners' reply topics (idempotent: keyed by request id)."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.known: set[str] = set()  # logical names of reply topics found to exist
        self._admin: AIOKafkaAdminClient | None = None

    async def _look_up(self, wanted: set[str]) -> None:
        """Add to `known` those of the `wanted` reply topics that exist now."""
        unknown = wanted - self.known
        if not unknown:
            return
        if self._admin is None:
            self._admin = admin_client(self.settings)
            await self._admin.start()
        found = await existing_topics(
            self._admin, [topics.scoped(self.settings, t) for t in sorted(unknown)]
        )
        ns = self.settings.topic_namespace
        self.known |= {t.removeprefix(ns) for t in found}

    async def relay_many(self, results: Sequence[InferenceResult]) -> int:
        """Copy each result to its owner's reply topic, where there is one; returns how many
        were copied."""
        owned = [(topics.reply_topic(r["user_id"]), r) for r in results if r.get("user_id")]
        await self._look_up({topic for topic, _ in owned})
        copied = 0
        for topic, result in owned:
            if topic in self.known:
                await self.bus.send(topic, "InferenceResult", result, key=result["request_id"])
                copied += 1
        return copied

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()

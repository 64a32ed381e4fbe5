"""Answers for Kafka clients: every terminal result is copied to its owner's reply topic.

`fedllm.results` is read only by gateways (ACL); a Kafka client reads
`fedllm.replies.<user_id>` (`fedllm.common.topics.reply_topic`), which an ACL lets only that
user read, so a client never sees anyone else's answers. The copy is made only when that topic
exists (created by the client library or provisioned by an operator), so users who only use
HTTP cost nothing. The owner is the result's `user_id`, which the accountant took from the
verified credential; results refused before any identity was established are not copied.
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient

from fedllm.common import topics
from fedllm.common.config import Settings
from fedllm.common.kafka import Bus, admin_client
from fedllm.schemas.records import InferenceResult

log = logging.getLogger(__name__)


class ReplyRelay:
    """Copies terminal results to the owners' reply topics (idempotent: keyed by request id)."""

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.known: set[str] = set()
        self._admin: AIOKafkaAdminClient | None = None

    async def _exists(self, topic: str) -> bool:
        if topic in self.known:
            return True
        if self._admin is None:
            self._admin = admin_client(self.settings)
            await self._admin.start()
        ns = self.settings.topic_namespace  # `known` holds logical names, as the bus takes
        self.known = {
            t.removeprefix(ns)
            for t in await self._admin.list_topics()
            if t.startswith(ns + topics.REPLIES_PREFIX)
        }
        return topic in self.known

    async def relay(self, result: InferenceResult) -> bool:
        """Copy `result` to its owner's reply topic; False when there is none."""
        user = result.get("user_id") or ""
        if not user:
            return False
        topic = topics.reply_topic(user)
        if not await self._exists(topic):
            return False
        await self.bus.send(topic, "InferenceResult", result, key=result["request_id"])
        return True

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()

"""Collectable results: idempotency keys, request owners and terminal results, kept for
`result_retention_s` (Redis when REDIS_URL is set — shared by every gateway — else in-process).

`ResultArchiver` stores every terminal result from `fedllm.results` in a consumer group of its
own, committing offsets only after the store has it, so a result finished while no gateway
ran (or after the caller's 504) is still there for `GET /v1/inference/{request_id}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from typing import Any, Protocol, cast

from fedllm.common import codec, topics
from fedllm.common.config import Settings
from fedllm.common.kafka import make_consumer
from fedllm.schemas.records import InferenceResult

log = logging.getLogger(__name__)


def _text(value: bytes | str) -> str:
    """A Redis reply as text (this client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


class ResultStore(Protocol):
    async def claim(self, *, user_id: str, key: str, request_id: str) -> str:
        """Bind (user, Idempotency-Key) to `request_id` unless bound: the bound request id."""

    async def release(self, *, user_id: str, key: str) -> None: ...

    async def set_owner(self, request_id: str, user_id: str) -> None: ...

    async def owner(self, request_id: str) -> str | None: ...

    async def put(self, record: InferenceResult) -> None: ...

    async def get(self, request_id: str) -> InferenceResult | None: ...

    async def close(self) -> None: ...


def _idem(prefix: str, user_id: str, key: str) -> str:
    digest = hashlib.sha256(user_id.encode() + b"\x00" + key.encode()).hexdigest()
    return f"{prefix}:idem:{digest}"


class MemoryResultStore:
    """One process's store (the embedded default), entries expiring after `retention_s`."""

    def __init__(self, *, retention_s: int, prefix: str = "fedllm:gw") -> None:
        self.retention_s = retention_s
        self.prefix = prefix
        # Texts (ids) and result records, as given: nothing here needs them serialised.
        self._data: dict[str, tuple[float, Any]] = {}

    def _get(self, key: str) -> Any:
        hit = self._data.get(key)
        if hit is None or hit[0] < time.monotonic():
            self._data.pop(key, None)
            return None
        return hit[1]

    def _set(self, key: str, value: Any) -> None:
        self._data[key] = (time.monotonic() + self.retention_s, value)
        if len(self._data) > 100_000:  # bounded: drop expired entries
            now = time.monotonic()
            self._data = {k: v for k, v in self._data.items() if v[0] >= now}

    async def claim(self, *, user_id: str, key: str, request_id: str) -> str:
        k = _idem(self.prefix, user_id, key)
        bound = self._get(k)
        if bound is None:
            self._set(k, request_id)
            return request_id
        return bound

    async def release(self, *, user_id: str, key: str) -> None:
        self._data.pop(_idem(self.prefix, user_id, key), None)

    async def set_owner(self, request_id: str, user_id: str) -> None:
        self._set(f"{self.prefix}:owner:{request_id}", user_id)

    async def owner(self, request_id: str) -> str | None:
        return self._get(f"{self.prefix}:owner:{request_id}")

    async def put(self, record: InferenceResult) -> None:
        self._set(f"{self.prefix}:result:{record['request_id']}", dict(record))

    async def get(self, request_id: str) -> InferenceResult | None:
        record = self._get(f"{self.prefix}:result:{request_id}")
        return cast(InferenceResult, dict(record)) if record else None

    async def close(self) -> None:
        self._data.clear()


class RedisResultStore:
    """The same in Redis, with TTLs; a result is written once (first terminal result wins)."""

    def __init__(self, url: str, *, retention_s: int, prefix: str = "fedllm:gw") -> None:
        import redis.asyncio as redis

        self.redis = redis.from_url(url)
        self.retention_s = retention_s
        self.prefix = prefix

    async def claim(self, *, user_id: str, key: str, request_id: str) -> str:
        k = _idem(self.prefix, user_id, key)
        if await self.redis.set(k, request_id, nx=True, ex=self.retention_s):
            return request_id
        bound = await self.redis.get(k)
        return _text(bound) if bound else request_id

    async def release(self, *, user_id: str, key: str) -> None:
        await self.redis.delete(_idem(self.prefix, user_id, key))

    async def set_owner(self, request_id: str, user_id: str) -> None:
        await self.redis.set(f"{self.prefix}:owner:{request_id}", user_id, ex=self.retention_s)

    async def owner(self, request_id: str) -> str | None:
        v = await self.redis.get(f"{self.prefix}:owner:{request_id}")
        return _text(v) if v else None

    async def put(self, record: InferenceResult) -> None:
        await self.redis.set(
            f"{self.prefix}:result:{record['request_id']}",
            json.dumps(record),
            nx=True,
            ex=self.retention_s,
        )

    async def get(self, request_id: str) -> InferenceResult | None:
        raw = await self.redis.get(f"{self.prefix}:result:{request_id}")
        return json.loads(raw) if raw else None

    async def close(self) -> None:
        await self.redis.aclose()


def make_result_store(redis_url: str, *, retention_s: int, prefix: str) -> ResultStore:
    if redis_url:
        return RedisResultStore(redis_url, retention_s=retention_s, prefix=prefix)
    return MemoryResultStore(retention_s=retention_s, prefix=prefix)


class ResultArchiver:
    """Stores each terminal result, then commits its offset (group `<prefix>-results`)."""

    def __init__(self, settings: Settings, store: ResultStore, *, group_id: str) -> None:
        self.settings = settings
        self.store = store
        self.group_id = group_id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-result-archiver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            consumer = make_consumer(self.settings, topics.RESULTS, group_id=self.group_id)
            try:
                await consumer.start()
                while True:
                    batches = await consumer.getmany(timeout_ms=200, max_records=500)
                    for msgs in batches.values():
                        for msg in msgs:
                            try:
                                record = codec.decode_as(InferenceResult, msg.value, msg.headers)
                            except codec.DecodeError:
                                continue  # the accountant's DLQ is the place for these
                            await self.store.put(record)
                    if batches:
                        await consumer.commit()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("result archiver failed (%r); restarting", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

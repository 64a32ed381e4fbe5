"""Sliding-window counters for rate limits and lockouts: Redis sorted sets, or in-process.

Both backends behave the same: a window key holds one timestamped member per event; events
older than the window fall out. `hit` admits an event only if every key is under its limit
(all-or-nothing, atomic in Redis via one Lua script), else reports when the earliest key frees
up. Several gateway processes sharing one Redis share every window.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Window:
    """One limit: at most `limit` events per `window_s` seconds under `key`."""

    key: str
    limit: int
    window_s: int


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after_s: int = 0  # whole seconds until the blocking window admits one more
    blocked_key: str = ""


class RateLimiter(Protocol):
    async def hit(self, windows: list[Window]) -> Verdict: ...
    async def count(self, window: Window) -> tuple[int, int]: ...  # (events, retry_after_s)
    async def add(self, window: Window) -> int: ...  # records one event, returns the count
    async def clear(self, key: str) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...


def _retry_after(oldest_ms: float, window_s: int, now_ms: float) -> int:
    return max(1, math.ceil((oldest_ms + window_s * 1000 - now_ms) / 1000))


class MemoryRateLimiter:
    """In-process sliding windows (one gateway process; used when REDIS_URL is unset)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._events: dict[str, deque[float]] = {}
        self._clock = clock

    def _now_ms(self) -> float:
        return self._clock() * 1000

    def _live(self, key: str, window_s: int, now: float) -> deque[float]:
        q = self._events.setdefault(key, deque())
        cutoff = now - window_s * 1000
        while q and q[0] <= cutoff:
            q.popleft()
        return q

    async def hit(self, windows: list[Window]) -> Verdict:
        now = self._now_ms()
        worst: Verdict | None = None
        for w in windows:
            q = self._live(w.key, w.window_s, now)
            if len(q) >= w.limit:
                ra = _retry_after(q[len(q) - w.limit], w.window_s, now)
                if worst is None or ra > worst.retry_after_s:
                    worst = Verdict(False, ra, w.key)
        if worst is not None:
            return worst
        for w in windows:
            self._events[w.key].append(now)
        return Verdict(True)

    async def count(self, window: Window) -> tuple[int, int]:
        now = self._now_ms()
        q = self._live(window.key, window.window_s, now)
        if len(q) >= window.limit:
            return len(q), _retry_after(q[len(q) - window.limit], window.window_s, now)
        return len(q), 0

    async def add(self, window: Window) -> int:
        now = self._now_ms()
        q = self._live(window.key, window.window_s, now)
        q.append(now)
        return len(q)

    async def clear(self, key: str) -> None:
        self._events.pop(key, None)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._events.clear()


# KEYS: window keys. ARGV: member, then (limit, window_ms) per key. Uses the server clock so
# that every gateway agrees on time. Returns {1, 0, 0} or {0, retry_after_ms, blocking index}.
_HIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local worst_ms, worst_i = -1, 0
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local n = redis.call('ZCARD', key)
  if n >= limit then
    local edge = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
    local wait = tonumber(edge[2]) + window - now
    if wait > worst_ms then worst_ms, worst_i = wait, i end
  end
end
if worst_i > 0 then return {0, worst_ms, worst_i} end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', key, now, ARGV[1] .. ':' .. now)
  redis.call('PEXPIRE', key, window)
end
return {1, 0, 0}
"""

_COUNT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n >= limit then
  local edge = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  return {n, tonumber(edge[2]) + window - now}
end
return {n, 0}
"""

_ADD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. now)
redis.call('PEXPIRE', KEYS[1], window)
return redis.call('ZCARD', KEYS[1])
"""


class RedisRateLimiter:
    """Sliding windows in Redis sorted sets, shared by every gateway instance."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._hit = self.client.register_script(_HIT_LUA)
        self._count = self.client.register_script(_COUNT_LUA)
        self._add = self.client.register_script(_ADD_LUA)

    async def hit(self, windows: list[Window]) -> Verdict:
        args: list[str | int] = [uuid.uuid4().hex]
        for w in windows:
            args += [w.limit, w.window_s * 1000]
        allowed, wait_ms, idx = await self._hit(keys=[w.key for w in windows], args=args)
        if int(allowed):
            return Verdict(True)
        return Verdict(False, max(1, math.ceil(int(wait_ms) / 1000)), windows[int(idx) - 1].key)

    async def count(self, window: Window) -> tuple[int, int]:
        n, wait_ms = await self._count(
            keys=[window.key], args=[window.limit, window.window_s * 1000]
        )
        return int(n), (max(1, math.ceil(int(wait_ms) / 1000)) if int(n) >= window.limit else 0)

    async def add(self, window: Window) -> int:
        return int(
            await self._add(keys=[window.key], args=[uuid.uuid4().hex, window.window_s * 1000])
        )

    async def clear(self, key: str) -> None:
        await self.client.delete(key)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()


class LimiterUnavailable(Exception):
    """The shared limiter store did not answer; the gateway fails closed (503)."""


def make_limiter(redis_url: str) -> RateLimiter:
    return RedisRateLimiter(redis_url) if redis_url else MemoryRateLimiter()

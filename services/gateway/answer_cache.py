"""A DP-aware answer cache in Redis: the same question gets the same release, for free.

Re-serving a release that was already made is post-processing, so it costs no patient any
privacy, charges no budget and cannot be averaged (the same noise comes back every time).

Key: HMAC-SHA256 (secret from settings) of the canonical JSON of the request's *public*
content (:func:`cache_content`): kind, the normalised question or the canonical aggregate query,
the public decoding parameters, ε rounded to the published grid, δ, and every hospital the
request may run on with the public data version its node announces. No prompt text reaches a
Redis key; values are AES-GCM encrypted (key derived from the same secret, the Redis key as
associated data) and hold only what the requester of the release saw.

Redis layout under ``<redis_prefix>:cache``:

* ``e:<digest>``  the encrypted release, with the TTL;
* ``lru``         sorted set of ``<digest>|<h1,h2,...>`` by last use (the size bound evicts the
  least recently used; the member names the hospitals so eviction can clean the indexes);
* ``h:<hospital>`` set of the members whose scope includes the hospital (retirement);
* ``v:<hospital>`` the data version last seen for the hospital; a change retires its releases;
* ``l:<digest>``  the fill lease: one fresh release per key at a time (single flight), so
  concurrent identical requests wait for the first one instead of drawing fresh noise.

Every Redis failure degrades to a miss (a fresh release), never to an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import unicodedata
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

KEY_VERSION = 1
UNKNOWN_VERSION = "?"  # a hospital no heartbeat has announced yet


# -- keys ---------------------------------------------------------------------------------------


def normalise_question(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, trailing ``?.!`` and spaces dropped."""
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return folded.rstrip(" ?.!")


def canonical_query(text: str) -> str:
    """An aggregate query as canonical JSON (sorted keys, no spaces)."""
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def epsilon_grid_index(epsilon: float, *, step: float) -> int:
    """The published ε grid: ε is rounded to the nearest multiple of ``step`` (at least one)."""
    return max(1, round(epsilon / step))


def cache_content(
    *,
    kind: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    require_consensus: bool,
    epsilon: float,
    epsilon_step: float,
    delta: float,
    department: str,
    hospitals: Sequence[str],
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """The normalised public content a release is keyed by.

    ``hospitals`` is the request's explicit list, or empty when the router chooses; then the
    department (which steers routing) and every hospital in ``versions`` form the scope.
    """
    scope = sorted(set(hospitals)) if hospitals else sorted(versions)
    return {
        "v": KEY_VERSION,
        "kind": kind,
        "q": canonical_query(prompt) if kind == "aggregate" else normalise_question(prompt),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "require_consensus": require_consensus,
        "eps_grid": [epsilon_grid_index(epsilon, step=epsilon_step), epsilon_step],
        "delta": delta,
        "routed_for": "" if hospitals else department,
        "data": [[h, versions.get(h, UNKNOWN_VERSION)] for h in scope],
    }


def _text(value: bytes | str) -> str:
    """A Redis reply as text (this client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Where a release lives: the HMAC digest and the hospitals (with versions) it depends on."""

    digest: str
    versions: tuple[tuple[str, str], ...]

    @property
    def member(self) -> str:
        return f"{self.digest}|{','.join(h for h, _ in self.versions)}"


def make_key(secret: bytes, content: Mapping[str, Any]) -> CacheKey:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()
    return CacheKey(digest=digest, versions=tuple((h, v) for h, v in content["data"]))


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CachedRelease:
    """What the requester of the original release saw, and when it was made."""

    release_id: str  # the request id of the fresh release
    released_at_ms: int
    response: str
    node_id: str
    tokens: int
    is_private: bool
    privacy_cost: float  # ε the release spent when it was made
    epsilon: float  # ε its requester asked for

    @classmethod
    def from_result(cls, result: Mapping[str, Any], *, epsilon: float) -> CachedRelease:
        return cls(
            release_id=result["request_id"],
            released_at_ms=int(result["finished_at_ms"]),
            response=result["response"],
            node_id=result["node_id"],
            tokens=int(result["tokens"]),
            is_private=bool(result["is_private"]),
            privacy_cost=float(result["privacy_cost"]),
            epsilon=float(epsilon),
        )


def seal(aead: AESGCM, key: CacheKey, release: CachedRelease) -> bytes:
    nonce = os.urandom(12)
    plain = json.dumps(asdict(release), separators=(",", ":")).encode()
    return nonce + aead.encrypt(nonce, plain, key.digest.encode())


def unseal(aead: AESGCM, key: CacheKey, blob: bytes) -> CachedRelease:
    plain = aead.decrypt(blob[:12], blob[12:], key.digest.encode())
    return CachedRelease(**json.loads(plain))


def derive(secret: bytes, label: str) -> bytes:
    return hmac.new(secret, label.encode(), hashlib.sha256).digest()


# -- metrics ------------------------------------------------------------------------------------


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "fedllm_gateway_cache_lookups_total",
            "Answer-cache lookups by outcome (hit, miss, unavailable: Redis did not answer).",
            ["outcome"],
            registry=registry,
        )
        self.hit_ratio = Gauge(
            "fedllm_gateway_cache_hit_ratio",
            "Hits over lookups since this gateway started.",
            registry=registry,
        )
        self.epsilon_saved = Counter(
            "fedllm_gateway_cache_epsilon_saved_total",
            "Epsilon not spent because a cached release was re-served, by department.",
            ["department"],
            registry=registry,
        )
        self.retired = Counter(
            "fedllm_gateway_cache_retired_total",
            "Cached releases retired (data version change, erasure, size bound).",
            ["why"],
            registry=registry,
        )
        self._hits = 0
        self._total = 0

    def looked_up(self, outcome: str) -> None:
        self.lookups.labels(outcome).inc()
        self._total += 1
        self._hits += outcome == "hit"
        self.hit_ratio.set(self._hits / self._total)


def _holder(key: CacheKey) -> tuple[str, int]:
    return key.digest, id(asyncio.current_task())


# -- the store ----------------------------------------------------------------------------------


class AnswerCache:
    """Releases in Redis, bounded by ``max_entries`` (LRU) and ``ttl_s``; see module doc."""

    def __init__(
        self,
        url: str,
        *,
        secret: bytes,
        prefix: str,
        ttl_s: int,
        max_entries: int,
        epsilon_step: float,
        registry: CollectorRegistry,
        timeout_s: float = 0.5,
        outage_backoff_s: float = 2.0,
        poll_s: float = 0.05,
    ) -> None:
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.key_secret = derive(secret, "fedllm-answer-cache-key-v1")
        self.aead = AESGCM(derive(secret, "fedllm-answer-cache-value-v1"))
        self.prefix = f"{prefix}:cache"
        self.ttl_ms = ttl_s * 1000
        self.max_entries = max_entries
        self.epsilon_step = epsilon_step
        self.metrics = CacheMetrics(registry)
        self.outage_backoff_s = outage_backoff_s
        self.poll_s = poll_s
        self._down_until = 0.0
        # (digest, request task) -> the fill-lease token that request holds; lookup and settle
        # run in the same request task, so a waiter that gave up never frees another's lease.
        self._leases: dict[tuple[str, int], str] = {}

    # Redis key names
    def _entry(self, digest: str) -> str:
        return f"{self.prefix}:e:{digest}"

    def _index(self, hospital: str) -> str:
        return f"{self.prefix}:h:{hospital}"

    def _version(self, hospital: str) -> str:
        return f"{self.prefix}:v:{hospital}"

    def _lease(self, digest: str) -> str:
        return f"{self.prefix}:l:{digest}"

    @property
    def _lru(self) -> str:
        return f"{self.prefix}:lru"

    def key(self, content: Mapping[str, Any]) -> CacheKey:
        return make_key(self.key_secret, content)

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.outage_backoff_s
        log.warning(
            "answer cache %s failed (%r); fresh releases for %.0fs",
            what,
            exc,
            self.outage_backoff_s,
        )

    async def lookup(self, key: CacheKey, *, wait_s: float) -> CachedRelease | None:
        """The cached release for ``key``, or None: make a fresh one (this call then holds the
        fill lease when Redis answered; pass the outcome to :meth:`settle`). While another
        request holds the lease, wait up to ``wait_s`` for its release."""
        if not self._available():
            self.metrics.looked_up("unavailable")
            return None
        try:
            found = await self._lookup(key, wait_s=wait_s)
        except Exception as exc:
            self._failed("lookup", exc)
            self.metrics.looked_up("unavailable")
            return None
        self.metrics.looked_up("hit" if found is not None else "miss")
        return found

    async def _lookup(self, key: CacheKey, *, wait_s: float) -> CachedRelease | None:
        await self._observe_versions(key)
        deadline = time.monotonic() + wait_s
        token = uuid.uuid4().hex
        while True:
            blob = await self.client.get(self._entry(key.digest))
            if blob is not None:
                await self.client.zadd(self._lru, {key.member: time.time()})
                return unseal(self.aead, key, blob if isinstance(blob, bytes) else blob.encode())
            lease_ms = max(1000, int(wait_s * 2000) + 5000)
            if await self.client.set(self._lease(key.digest), token, nx=True, px=lease_ms):
                self._leases[_holder(key)] = token
                return None
            if time.monotonic() >= deadline:
                return None  # the other request is slow: go fresh without the lease
            await asyncio.sleep(self.poll_s)

    async def _observe_versions(self, key: CacheKey) -> None:
        """Retire a hospital's releases when its announced data version changed."""
        known = [(h, v) for h, v in key.versions if v != UNKNOWN_VERSION]
        if not known:
            return
        seen = await self.client.mget([self._version(h) for h, _ in known])
        for (hospital, version), old in zip(known, seen, strict=True):
            if old is None or _text(old) != version:
                await self.client.set(self._version(hospital), version)
                if old is not None:
                    await self.retire(hospital, why="data_version")

    async def settle(
        self, key: CacheKey, result: Mapping[str, Any] | None, *, epsilon: float
    ) -> None:
        """After a fresh attempt: store an ok DP release, and free the lease either way."""
        token = self._leases.pop(_holder(key), None)
        if not self._available():
            return
        try:
            if result is not None and result.get("status") == "ok" and result.get("is_private"):
                await self.store(key, CachedRelease.from_result(result, epsilon=epsilon))
            if token is not None:
                lease = self._lease(key.digest)
                if _text(await self.client.get(lease) or b"") == token:
                    await self.client.delete(lease)
        except Exception as exc:
            self._failed("store", exc)

    async def store(self, key: CacheKey, release: CachedRelease) -> None:
        member = key.member
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._entry(key.digest), seal(self.aead, key, release), px=self.ttl_ms)
        pipe.zadd(self._lru, {member: time.time()})
        for hospital, _ in key.versions:
            pipe.sadd(self._index(hospital), member)
        pipe.zcard(self._lru)
        size = int((await pipe.execute())[-1])
        if size > self.max_entries:
            evicted = cast(
                list[tuple[bytes, float]],
                await self.client.zpopmin(self._lru, size - self.max_entries),
            )
            await self._drop([_text(m) for m, _ in evicted])
            self.metrics.retired.labels("size_bound").inc(len(evicted))

    async def _drop(self, members: list[str]) -> None:
        if not members:
            return
        pipe = self.client.pipeline(transaction=False)
        for m in members:
            digest, _, hospitals = m.partition("|")
            pipe.delete(self._entry(digest))
            pipe.zrem(self._lru, m)
            for h in filter(None, hospitals.split(",")):
                pipe.srem(self._index(h), m)
        await pipe.execute()

    async def retire(self, hospital: str, *, why: str = "erasure") -> int:
        """Delete every cached release whose scope includes ``hospital``; how many."""
        members = [_text(m) for m in await self.client.smembers(self._index(hospital))]
        await self._drop(members)
        await self.client.delete(self._index(hospital))
        self.metrics.retired.labels(why).inc(len(members))
        return len(members)

    async def size(self) -> int:
        return int(await self.client.zcard(self._lru))

    async def close(self) -> None:
        await self.client.aclose()

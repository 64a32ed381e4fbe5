"""A consumer's fetch wait that lengthens while it is idle and snaps back when data flows.

On a broker that does not wake a waiting fetch when data arrives (the local Tansu broker, see
the BROKER notes), request/reply latency needs a short fetch wait (`fetch_max_wait_ms`, 10 ms),
but then every idle consumer makes ~100 broker round trips a second. :func:`adapt` makes an
aiokafka consumer (after `start()`) use `idle_fetch_max_wait_ms` once none of its fetches has
brought records for `idle_after_ms` (and `deep_idle_fetch_max_wait_ms` after
`deep_idle_after_ms`), and its configured wait again from the first fetch that brings some.
Under traffic every consumer stays on the short wait; the first request after an idle spell
pays up to one idle wait per hop. `idle_fetch_max_wait_ms` ≤ the configured wait
turns it off. On Apache Kafka a waiting fetch is answered as soon as data arrives, so a long
wait costs nothing there either way.

It sets the consumer's private fetcher fields (aiokafka 0.14: `Fetcher._fetch_max_wait_ms`,
read when each fetch request is built, and `Fetcher._proc_fetch_request`, which reports
whether a fetch brought records); if they are missing it leaves the consumer as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedllm.common.config import Settings

log = logging.getLogger(__name__)


class IdleFetchWait:
    """The switch for one started consumer's fetcher: `hot_ms` while data flows, then each
    tier's wait once no fetch brought records for that tier's time (`tiers`: (after seconds,
    wait ms), ascending)."""

    def __init__(self, fetcher: Any, *, hot_ms: int, tiers: Sequence[tuple[float, int]]) -> None:
        self.fetcher = fetcher
        self.hot_ms = hot_ms
        self.tiers = sorted(tiers)
        self.last_data = time.monotonic()
        self._proc = fetcher._proc_fetch_request
        fetcher._proc_fetch_request = self._proc_fetch_request
        fetcher._idle_fetch_wait = self

    @property
    def idle(self) -> bool:
        return bool(self.fetcher._fetch_max_wait_ms != self.hot_ms)

    async def _proc_fetch_request(self, *args: Any, **kwargs: Any) -> Any:
        got_records = await self._proc(*args, **kwargs)
        now = time.monotonic()
        wait = self.hot_ms
        if got_records:
            self.last_data = now
        else:  # the longest tier whose silence has passed
            for after_s, tier_ms in self.tiers:
                if now - self.last_data >= after_s:
                    wait = tier_ms
        self.fetcher._fetch_max_wait_ms = wait
        return got_records


def adapt(
    consumer: Any,
    *,
    idle_ms: int,
    idle_after_ms: int,
    deep_ms: int = 0,
    deep_after_ms: int = 0,
) -> IdleFetchWait | None:
    """Install the idle switch on a started aiokafka consumer: `idle_ms` after `idle_after_ms`
    without data, `deep_ms` after `deep_after_ms` (a tier whose wait is not longer than the
    consumer's own is left out); None when no tier applies or the fields are missing."""
    fetcher = getattr(consumer, "_fetcher", None)
    hot_ms = getattr(fetcher, "_fetch_max_wait_ms", None)
    if fetcher is None or hot_ms is None or not hasattr(fetcher, "_proc_fetch_request"):
        log.warning("consumer without the expected fetcher fields: fetch wait left fixed")
        return None
    tiers = [
        (after_ms / 1000, ms)
        for after_ms, ms in ((idle_after_ms, idle_ms), (deep_after_ms, deep_ms))
        if ms > hot_ms
    ]
    if not tiers:
        return None
    installed: IdleFetchWait | None = getattr(fetcher, "_idle_fetch_wait", None)
    if installed is not None:
        return installed
    return IdleFetchWait(fetcher, hot_ms=int(hot_ms), tiers=tiers)


def adapt_to(consumer: Any, settings: Settings) -> IdleFetchWait | None:
    """`adapt` with the idle tiers of `settings` (every consumer of the pipeline, faust's too)."""
    return adapt(
        consumer,
        idle_ms=settings.idle_fetch_max_wait_ms,
        idle_after_ms=settings.idle_after_ms,
        deep_ms=settings.deep_idle_fetch_max_wait_ms,
        deep_after_ms=settings.deep_idle_after_ms,
    )

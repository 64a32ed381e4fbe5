"""One way to hand a consumed event to its handler: retry, then dead-letter — never skip.

`deliver` returns only when the event's effects are durable: either the handler succeeded, or,
after `RetryPolicy.attempts` failed attempts with exponential backoff, its terminal outcome was
recorded (`on_dead`: e.g. a failed result and a refund) and the raw event was sent to
`<topic>.dlq`. Callers acknowledge the event (commit the offset; `event.ack()` on a faust
`noack()` stream) only after `deliver` returns. If the dead-letter path itself fails (the
database or broker is down) it is retried until it succeeds; if `stop` is set meanwhile,
`Stopped` is raised and the event stays unacknowledged, so it is re-delivered on restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from fedllm.common.metrics import MESSAGES

log = logging.getLogger(__name__)

Delivered = Literal["handled", "dead_lettered", "failed"]


class Stopped(Exception):
    """Asked to stop before the event's effects were durable: do not acknowledge it."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`attempts` tries of the handler, waiting initial_s, 2·initial_s, … (at most max_s)."""

    attempts: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("need 0 < initial_s <= max_s")

    def delay(self, attempt: int) -> float:
        """Wait after failed attempt number `attempt` (1-based)."""
        return min(self.initial_s * 2.0 ** (attempt - 1), self.max_s)

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(
            attempts=settings.delivery_attempts,
            initial_s=settings.delivery_backoff_s,
            max_s=settings.delivery_backoff_max_s,
        )


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    if stop.is_set():
        raise Stopped


def describe(exc: BaseException) -> str:
    """One line naming the error (no message bodies)."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"[:900]


async def deliver(
    msg: Any,
    handle: Callable[[], Awaitable[object]],
    *,
    bus: Any,
    service: str,
    policy: RetryPolicy,
    on_dead: Callable[[str], Awaitable[object]] | None = None,
    stop: asyncio.Event | None = None,
    batch: int = 0,
) -> Delivered:
    """Run `handle()` for `msg` until it succeeds or is dead-lettered (see module docstring).

    `msg` is the consumed record (topic, partition, offset, key, value, headers); `bus` a
    `fedllm.common.kafka.Bus`; `on_dead(error)` records the event's terminal outcome.
    `batch` > 0: `handle` handles a batch of that many events (`msg` its first); after the
    last failed attempt nothing is dead-lettered and "failed" is returned, so that the caller
    delivers the events one by one (which isolates a poison event).
    """
    error = ""
    for attempt in range(1, policy.attempts + 1):
        try:
            await handle()
            MESSAGES.labels(service, msg.topic, "handled").inc(batch or 1)
            return "handled"
        except Exception as exc:  # every handler error is retried, then dead-lettered
            error = describe(exc)
            log.warning(
                "%s: handling %s[%d]@%d failed (attempt %d of %d): %s",
                service,
                msg.topic,
                msg.partition,
                msg.offset,
                attempt,
                policy.attempts,
                error,
            )
        if attempt < policy.attempts:
            await _pause(policy.delay(attempt), stop)
    if batch:
        return "failed"
    reason = f"not processed after {policy.attempts} attempts: {error}"
    wait = policy.initial_s
    while True:  # the dead-letter path must complete before the event is acknowledged
        try:
            if on_dead is not None:
                await on_dead(reason)
            await bus.dead_letter(msg, reason, service=service, attempts=policy.attempts)
            MESSAGES.labels(service, msg.topic, "dead_lettered").inc()
            return "dead_lettered"
        except Exception as exc:
            log.error(
                "%s: dead-lettering %s[%d]@%d failed, retrying in %.1fs: %s",
                service,
                msg.topic,
                msg.partition,
                msg.offset,
                wait,
                describe(exc),
            )
        await _pause(wait, stop)
        wait = min(wait * 2, policy.max_s)

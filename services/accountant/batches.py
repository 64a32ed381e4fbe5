"""Natural batching of a stream: a batch is what arrived while the previous batch was handled.

faust's `noack_take(max, within)` waits out a fixed window for every batch, so a lone request
paid up to the window on each accountant hop, and an idle agent woke every window. Here the
first event of a batch is handed on at once, with whatever else has already arrived (up to
`max_size`); under load events queue while a batch is handled, so batches grow by themselves
(group commit). Nothing waits on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def natural_batches(source: AsyncIterable[T], max_size: int) -> AsyncIterator[list[T]]:
    """Batches of `source`'s items, in order, each of 1..`max_size` items. At most `max_size`
    items are read ahead of the batch being handled. An error of `source` is raised here once
    the items read before it have been yielded; the end of `source` ends the batches."""
    queue: asyncio.Queue[T] = asyncio.Queue(maxsize=max(1, max_size))

    async def pump() -> None:
        async for item in source:
            await queue.put(item)

    reader = asyncio.create_task(pump())
    try:
        while True:
            batch: list[T] = []
            if queue.empty():  # wait for the first item, or for the source to end
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    batch.append(getter.result())
                else:
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if queue.empty():
                        reader.result()  # raises the source's error, if any
                        return
            await asyncio.sleep(0)  # let the reader queue what has already arrived
            while len(batch) < max_size and not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader

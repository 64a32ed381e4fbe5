"""Natural batching (services/accountant/batches.py): no timer, order kept, nothing lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fedllm.services.accountant.batches import natural_batches


async def test_a_lone_item_is_handed_on_without_waiting_for_more() -> None:
    never = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 1
        await never.wait()  # nothing else ever arrives
        yield 2

    batches = natural_batches(source(), 256)
    assert await asyncio.wait_for(anext(batches), timeout=5) == [1]
    await batches.aclose()


async def test_what_arrives_during_a_batch_is_the_next_batch_in_order() -> None:
    release = asyncio.Event()

    async def source() -> AsyncIterator[int]:
        yield 0
        await release.wait()
        for i in range(1, 11):
            yield i

    got: list[list[int]] = []
    async for batch in natural_batches(source(), 4):
        got.append(batch)
        if batch == [0]:
            release.set()  # ten more arrive while this batch is "handled"
            await asyncio.sleep(0.05)
    assert got[0] == [0]
    assert all(1 <= len(b) <= 4 for b in got)
    assert [i for b in got for i in b] == list(range(11))
    assert max(len(b) for b in got) > 1  # what queued up went together


async def test_a_source_error_is_raised_after_the_items_before_it() -> None:
    async def source() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise RuntimeError("broker gone")

    got: list[int] = []
    with pytest.raises(RuntimeError, match="broker gone"):
        async for batch in natural_batches(source(), 8):
            got.extend(batch)
    assert got == [1, 2]


async def test_the_end_of_the_source_ends_the_batches() -> None:
    async def source() -> AsyncIterator[int]:
        for i in range(5):
            yield i

    got = [batch async for batch in natural_batches(source(), 2)]
    assert [i for b in got for i in b] == [0, 1, 2, 3, 4]
    assert all(len(b) <= 2 for b in got)

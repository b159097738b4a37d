"""A pool of trio workers over a stream of items: what push, pull and prefetch share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

T = TypeVar("T")


async def run_pool(items: Iterable[T], fn: Callable[[T], Awaitable[None]], jobs: int) -> None:
    """Run `fn` on every item, `jobs` at a time. After the first failure no new item
    starts; those in flight finish (cancelling a request mid-body leaves the HTTP
    client's streams half-consumed), then the failure is raised as itself, not in an
    exception group, so the CLI shows it as one line."""
    send, recv = trio.open_memory_channel[T](0)
    failures: list[Exception] = []

    async def worker(items_in: trio.MemoryReceiveChannel[T]) -> None:
        async with items_in:
            async for item in items_in:
                if failures:
                    continue
                try:
                    await fn(item)
                except Exception as e:
                    failures.append(e)

    async with trio.open_nursery() as nursery:
        for _ in range(max(1, jobs)):
            nursery.start_soon(worker, recv.clone())
        recv.close()
        async with send:
            for item in items:
                if failures:
                    break
                await send.send(item)
    if failures:
        raise failures[0]

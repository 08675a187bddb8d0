"""Lookups by key that arrive while one read is under way go together in the next read.

Every stream opens with a token read. One at a time, a connect storm of 1,000 trainers
paid 1,000 hops to a reader thread and 1,000 statements, and each hop's dispatch ran on
the event loop that was accepting the streams; batched, it pays one per batch. A caller
is answered by a read that began after it asked, so nothing it reads is older than its
call (a token revoked before it asked is seen revoked).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Keys in one read: one statement's parameters (SQLite allows 32,766; older builds 999).
MAX_BATCH = 256


class BatchedLookup(Generic[K, V]):
    """`get(key)` through `fetch(keys)`, which returns the values it found by key."""

    def __init__(
        self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], max_batch: int = MAX_BATCH
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        # Bounded by the callers waiting (one entry each at most): the hub's pending streams.
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        """`key`'s value (None: not found), read after this call began. A failed read
        raises its error in every caller it was for."""
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        return await future

    async def _read(self) -> None:
        """Read what waits, a batch at a time, until nothing does."""
        try:
            while self._waiting:
                keys = list(itertools.islice(self._waiting, self._max_batch))
                batch = {key: self._waiting.pop(key) for key in keys}
                try:
                    found = await self._fetch(keys)
                except Exception as exc:
                    for futures in batch.values():
                        _settle(futures, error=exc)
                    continue
                except BaseException:  # cancelled (the hub stops): no caller waits forever
                    for futures in batch.values():
                        _settle(futures, cancel=True)
                    raise
                for key, futures in batch.items():
                    _settle(futures, value=found.get(key))
        finally:
            self._reader = None
            waiting, self._waiting = self._waiting, {}
            for futures in waiting.values():
                _settle(futures, cancel=True)


def _settle(
    futures: list[asyncio.Future[V | None]],
    *,
    value: V | None = None,
    error: Exception | None = None,
    cancel: bool = False,
) -> None:
    """Answer the callers still waiting (one that gave up is done already)."""
    for future in futures:
        if future.done():
            continue
        if cancel:
            future.cancel()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

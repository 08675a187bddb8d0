"""BatchedLookup: lookups that arrive during a read go together in the next one."""

from __future__ import annotations

import asyncio

import pytest

from hub_service.batched_lookup import BatchedLookup


class Table:
    """A fetch whose reads each wait for `release` (when `gated`), recording their keys."""

    def __init__(self, rows: dict[str, int], gated: bool = True) -> None:
        self.rows = rows
        self.reads: list[list[str]] = []
        self.gated = gated
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_next: Exception | None = None

    async def fetch(self, keys: list[str]) -> dict[str, int]:
        self.reads.append(keys)
        self.started.set()
        if self.gated:
            await self.release.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return {k: self.rows[k] for k in keys if k in self.rows}


async def test_lookups_during_a_read_go_together_in_the_next_read() -> None:
    table = Table({"a": 1, "b": 2, "c": 3})
    lookup = BatchedLookup(table.fetch)
    first = asyncio.create_task(lookup.get("a"))
    await table.started.wait()
    later = [asyncio.create_task(lookup.get(k)) for k in ("b", "c", "b", "nobody")]
    await asyncio.sleep(0)
    table.release.set()
    assert await first == 1
    assert [await t for t in later] == [2, 3, 2, None]
    # The second read began after they asked, and asked for each key once.
    assert table.reads == [["a"], ["b", "c", "nobody"]]


async def test_a_read_holds_at_most_max_batch_keys() -> None:
    table = Table({str(i): i for i in range(5)}, gated=False)
    lookup = BatchedLookup(table.fetch, max_batch=2)
    values = await asyncio.gather(*(lookup.get(str(i)) for i in range(5)))
    assert values == [0, 1, 2, 3, 4]
    assert [len(keys) for keys in table.reads] == [2, 2, 1]


async def test_a_failed_read_fails_its_callers_and_the_next_read_goes_on() -> None:
    table = Table({"a": 1, "b": 2})
    lookup = BatchedLookup(table.fetch)
    table.fail_next = RuntimeError("database unavailable")
    failing = asyncio.create_task(lookup.get("a"))
    await table.started.wait()
    after = asyncio.create_task(lookup.get("b"))
    await asyncio.sleep(0)
    table.release.set()
    with pytest.raises(RuntimeError, match="database unavailable"):
        await failing
    assert await after == 2


async def test_a_caller_that_gives_up_leaves_the_others_answered() -> None:
    table = Table({"a": 1})
    lookup = BatchedLookup(table.fetch)
    leaving = asyncio.create_task(lookup.get("a"))
    staying = asyncio.create_task(lookup.get("a"))
    await table.started.wait()
    leaving.cancel()
    table.release.set()
    assert await staying == 1
    assert leaving.cancelled()


async def test_callers_waiting_when_the_reader_is_cancelled_do_not_wait_forever() -> None:
    table = Table({"a": 1, "b": 2})
    lookup = BatchedLookup(table.fetch)
    reading = asyncio.create_task(lookup.get("a"))
    await table.started.wait()
    queued = asyncio.create_task(lookup.get("b"))
    await asyncio.sleep(0)
    assert lookup._reader is not None
    lookup._reader.cancel()
    for caller in (reading, queued):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 5)
    # A new caller starts a new reader.
    table.release.set()
    assert await asyncio.wait_for(lookup.get("b"), 5) == 2

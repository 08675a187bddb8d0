"""The stream sender's wake-up (`connection.Wake`): set, timeout and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from hub_service.connection import Wake

from .conftest import WAIT


async def test_set_before_the_wait_returns_at_once() -> None:
    wake = Wake()
    wake.set()
    await asyncio.wait_for(wake.wait(asyncio.get_running_loop(), None), WAIT)


async def test_set_during_the_wait_wakes_it() -> None:
    wake = Wake()
    waiting = asyncio.create_task(wake.wait(asyncio.get_running_loop(), None))
    await asyncio.sleep(0)  # it is waiting now
    assert not waiting.done()
    wake.set()
    await asyncio.wait_for(waiting, WAIT)


async def test_a_timeout_ends_the_wait_unset() -> None:
    wake = Wake()
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(wake.wait(loop, 0.01), WAIT)
    wake.set()  # nobody waits: nothing to wake, and no error
    wake.clear()
    waiting = asyncio.create_task(wake.wait(loop, None))
    await asyncio.sleep(0)
    assert not waiting.done(), "cleared: the next wait waits"
    waiting.cancel()


async def test_a_cancelled_wait_leaves_nothing_behind() -> None:
    """Its timer is cancelled with it, and a later set wakes the next waiter only."""
    wake = Wake()
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(wake.wait(loop, 3600))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert wake._waiter is None
    second = asyncio.create_task(wake.wait(loop, None))
    await asyncio.sleep(0)
    wake.set()
    await asyncio.wait_for(second, WAIT)

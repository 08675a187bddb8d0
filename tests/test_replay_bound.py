"""A stream's catch-up when each log read is bounded (`replay_scan_seqs`): a model check.

`Connection` is driven against a model of the log with the properties the stores give:
seqs commit in order; a read asks whether the log goes on past its bound before it reads
the page, and commits may land before, between and after the two; some commits land but are
never published (a commit in doubt: `resync`); the live queue and the list kept during a
read overflow. Whatever interleaving a seed draws, the stream must hand over every event
its filter matches exactly once, in seq order, and then be level with the feed. The model
is deterministic per seed; it replaces neither the real-hub tests (test_subscriptions.py)
nor the stores' own (test_store_contract.py), which cannot force these interleavings.
"""

from __future__ import annotations

import asyncio
import random
from typing import cast

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.connection import Connection
from hub_service.lingers import Linger
from hub_service.metrics import HubMetrics
from hub_service.state import EventPage, HubStore
from hub_service.subscriptions import Filter

METRICS = HubMetrics()


class ModelLog:
    """The log, the router's head and one connection reading it back."""

    def __init__(self, rng: random.Random, scan: int) -> None:
        self.rng = rng
        self.scan = scan
        self.rows: dict[int, bool] = {}  # committed seq -> whether the reader's filter matches
        self.unpublished: list[list[int]] = []  # committed, in commit order
        self.head = 0
        self.quiet = False
        self.delivered: list[int] = []
        self.connection = Connection(
            pb.Hello(agent_id="reader"),
            token_hash="",
            store=cast(HubStore, None),  # read_log stands in for it
            max_inflight=8,
            queue_size=rng.choice([2, 4, 100]),
            events_per_response=64,
            replay_page_size=rng.choice([1, 2, 5]),
            max_bytes=1 << 20,
            metrics=METRICS,
            linger=Linger("stream", 0.0),
            replay_scan_seqs=scan,
            read_log=self.read_log,
            head=lambda: self.head,
        )
        self.match = rng.choice([0.05, 0.3, 0.9])

    def commit(self) -> None:
        first = max(self.rows, default=0) + 1
        seqs = list(range(first, first + self.rng.randint(1, 4)))
        for seq in seqs:
            self.rows[seq] = self.rng.random() < self.match
        if self.rng.random() < 0.03:
            self.connection.resync()  # landed, but its outcome is in doubt: never published
        else:
            self.unpublished.append(seqs)

    def publish(self) -> None:
        if self.unpublished:
            for seq in self.unpublished.pop(0):
                self.head = seq
                if self.rows[seq]:
                    self.connection.offer(pb.HubEvent(seq=seq, sender_id="sharer"))

    def drain(self) -> None:
        while self.connection._events:
            self.delivered.append(self.connection._events.popleft().seq)

    def step(self) -> None:
        if self.quiet:
            return
        draw = self.rng.random()
        if draw < 0.4:
            self.commit()
        elif draw < 0.8:
            self.publish()
        elif draw < 0.9:
            self.drain()

    def steps(self) -> None:
        for _ in range(self.rng.randint(0, 3)):
            self.step()

    async def read_log(self, after: int, limit: int, max_bytes: int, _: Filter) -> EventPage:
        """As the SQL store reads: the bound's check, then the page, each its own snapshot."""
        self.steps()
        through = after + self.scan
        beyond = any(seq > through for seq in self.rows)
        self.steps()
        matching = [s for s in sorted(self.rows) if after < s <= through and self.rows[s]]
        page = EventPage(pb.HubEvent(seq=s, sender_id="sharer") for s in matching[:limit])
        page.more = len(matching) > limit
        if beyond and not page.more:
            page.more, page.through = True, through
        self.steps()
        await asyncio.sleep(0)
        return page


async def run(seed: int, scan: int, model_of: type[ModelLog] = ModelLog) -> None:
    rng = random.Random(seed)
    model = model_of(rng, scan)
    connection = model.connection
    for _ in range(300):
        if rng.random() < 0.5:
            model.step()
        elif connection.catching_up and not connection._events:
            await connection._read_back()
        else:
            model.drain()
    model.quiet = True  # what is committed and not in doubt is published; the stream ends level
    while model.unpublished:
        model.publish()
    reads = 0
    while connection.catching_up:
        model.drain()
        await connection._read_back()
        reads += 1
        assert reads <= len(model.rows) + 10, f"seed {seed}: no progress at {connection.cursor}"
    model.drain()
    entitled = [seq for seq in sorted(model.rows) if model.rows[seq]]
    assert model.delivered == entitled, f"seed {seed}"


@pytest.mark.parametrize("scan", [1, 3, 10, 10_000])
async def test_every_matching_event_once_in_order_whatever_interleaves(scan: int) -> None:
    for seed in range(150):
        await run(seed, scan)


class OverreachingLog(ModelLog):
    """A store whose cut-short reads say they looked further than they did."""

    async def read_log(self, after: int, limit: int, max_bytes: int, f: Filter) -> EventPage:
        page = await super().read_log(after, limit, max_bytes, f)
        if page.through:
            page.through += self.scan
        return page


async def test_the_model_catches_a_read_that_overstates_where_it_stopped() -> None:
    """The check can fail: a cursor moved past rows no read looked at loses events."""
    failures = 0
    for seed in range(50):
        try:
            await run(seed, 3, OverreachingLog)
        except AssertionError:
            failures += 1
    assert failures > 0

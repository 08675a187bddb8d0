"""The group committer's pipe: the next batch goes to the store while one commits (at most
`depth` in flight, none smaller than the one before it), and outcomes are published in the
order the batches were sent, whatever order the store finishes them in.

The store here is a stand-in whose commits finish when the test says: what is under test is
the committer's scheduling, which no real store lets a test hold still. The end-to-end
paths (a real hub, the writer process) are in test_writer.py and every stream test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import pytest

from hub_service.committer import GroupCommitter
from hub_service.errors import StatusError
from hub_service.lingers import Linger
from hub_service.outcomes import Outcome
from hub_service.state import Command, StateTx

from .conftest import WAIT


@dataclass
class Note:
    """A command that only carries its number."""

    number: int
    agent_id: str = "AI_Node_1"
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        raise AssertionError("the gated store applies nothing")


@dataclass
class GatedStore:
    """Commits that finish when the test opens their gate; each outcome's seq is its note."""

    commits: list[tuple[list[int], asyncio.Future[None]]] = field(default_factory=list)

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        numbers = [c.number for c in commands]  # type: ignore[attr-defined]
        self.commits.append((numbers, gate))
        await gate
        return [Outcome(seq=n) for n in numbers]

    def sent(self) -> list[list[int]]:
        return [numbers for numbers, _ in self.commits]

    def finish(self, index: int) -> None:
        self.commits[index][1].set_result(None)


async def until(condition: Callable[[], bool]) -> None:
    """Runs the loop's ready callbacks until `condition` holds (nothing here waits on a
    clock, so a few hundred turns are plenty)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the committer never got there")


async def settled() -> None:
    """Lets every ready callback run."""
    for _ in range(50):
        await asyncio.sleep(0)


@dataclass
class Pipe:
    store: GatedStore
    committer: GroupCommitter
    published: list[int]
    answered: list[int | str]

    def submit(self, *numbers: int) -> None:
        for number in numbers:

            def reply(result: Outcome | StatusError, number: int = number) -> None:
                ok = isinstance(result, Outcome)
                self.answered.append(number if ok else f"{number}: {result.code.name}")  # type: ignore[union-attr]

            asyncio.get_running_loop().create_task(self.committer.enqueue(Note(number), reply))


@pytest.fixture(params=[{}], ids=["depth2"])
async def pipe(request: pytest.FixtureRequest) -> AsyncIterator[Pipe]:
    """A committer of depth 2 and no linger, unless the test's parameters say otherwise."""
    options = {"depth": 2, "linger": 0.0, **request.param}
    store = GatedStore()
    published: list[int] = []

    def publish(outcome: Outcome, answer: Callable[[], None]) -> None:
        published.append(outcome.seq)
        answer()

    committer = GroupCommitter(
        store,  # type: ignore[arg-type]  # only commit() is used
        publish,
        linger=Linger("commit", options["linger"]),
        depth=options["depth"],
    )
    committer.start()
    yield Pipe(store, committer, published, [])
    for _, gate in store.commits:
        if not gate.done():
            gate.set_result(None)
    await committer.stop(WAIT)


async def test_the_next_batch_goes_while_one_commits_once_as_much_waits(pipe: Pipe) -> None:
    pipe.submit(1)
    await until(lambda: pipe.store.sent() == [[1]])
    pipe.submit(2)  # as much as the batch in flight: sent at once, beside it
    await until(lambda: pipe.store.sent() == [[1], [2]])
    pipe.submit(3, 4)  # two in flight already: these wait
    await settled()
    assert pipe.store.sent() == [[1], [2]]
    pipe.store.finish(0)
    await until(lambda: len(pipe.store.sent()) == 3)
    assert pipe.store.sent()[2] == [3, 4], "what waited goes as one batch"
    assert pipe.published == [1]


async def test_a_batch_in_flight_holds_back_a_smaller_one(pipe: Pipe) -> None:
    """Two commits of one each would cost the writer two commits' fixed cost."""
    pipe.submit(1, 2, 3)
    await until(lambda: pipe.store.sent() == [[1, 2, 3]])
    pipe.submit(4, 5)
    await settled()
    assert pipe.store.sent() == [[1, 2, 3]], "two waiting, three in flight: not yet"
    pipe.submit(6)
    await until(lambda: pipe.store.sent() == [[1, 2, 3], [4, 5, 6]])


async def test_outcomes_are_published_in_the_order_sent_whatever_finishes_first(
    pipe: Pipe,
) -> None:
    pipe.submit(1)
    await until(lambda: pipe.store.sent() == [[1]])
    pipe.submit(2)
    await until(lambda: pipe.store.sent() == [[1], [2]])
    pipe.store.finish(1)  # the later batch finishes first
    await settled()
    assert pipe.published == [] and pipe.answered == []
    pipe.store.finish(0)
    await until(lambda: pipe.published == [1, 2])
    assert pipe.answered == [1, 2]


@pytest.mark.parametrize("pipe", [{"depth": 1}], ids=["depth1"], indirect=True)
async def test_a_depth_of_one_commits_one_batch_at_a_time(pipe: Pipe) -> None:
    pipe.submit(1)
    await until(lambda: pipe.store.sent() == [[1]])
    pipe.submit(2, 3)
    await settled()
    assert pipe.store.sent() == [[1]]
    pipe.store.finish(0)
    await until(lambda: pipe.store.sent() == [[1], [2, 3]])


async def test_stopping_answers_every_batch_in_flight_and_what_waits(pipe: Pipe) -> None:
    pipe.submit(1)
    await until(lambda: pipe.store.sent() == [[1]])
    pipe.submit(2)
    await until(lambda: pipe.store.sent() == [[1], [2]])
    pipe.submit(3)
    await settled()
    await pipe.committer.stop(0.05)  # the store never finishes: the timeout strikes
    unavailable = grpc.StatusCode.UNAVAILABLE.name
    assert sorted(map(str, pipe.answered)) == [f"{n}: {unavailable}" for n in (1, 2, 3)]
    assert pipe.published == []


@pytest.mark.parametrize("pipe", [{"linger": WAIT * 10}], ids=["lingering"], indirect=True)
async def test_a_stop_during_the_linger_answers_once_and_a_second_stop_has_nothing_left(
    pipe: Pipe,
) -> None:
    pipe.submit(1)
    await until(lambda: pipe.store.sent() == [[1]])
    pipe.store.finish(0)
    await until(lambda: pipe.published == [1])
    pipe.submit(2)  # just after a commit: it lingers for company
    await settled()
    assert pipe.store.sent() == [[1]]
    await pipe.committer.stop(0.05)
    await pipe.committer.stop(0.05)  # nothing left to answer, nothing to count twice
    assert pipe.answered == [1, f"2: {grpc.StatusCode.UNAVAILABLE.name}"]

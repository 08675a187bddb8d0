"""Presence is state, not history: a newcomer gets the roster of who is online, the others
learn of each join once, coalesced; nothing of it is in the event log or replayed."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import presence as presence_module
from hub_service.presence import BUSY_PAUSES, Presence
from hub_service.server import HubServer
from hub_service.testing import TestHub

from .conftest import WAIT, HubHarness, RawTrainer, hello, make_config, pattern

STORM = 300
LINGER = 0.5  # seconds; the test's presence linger


@contextlib.asynccontextmanager
async def memory_hub(**overrides: Any) -> AsyncIterator[HubHarness]:
    async with TestHub.in_process(make_config("memory://", **overrides)) as test_hub:
        server: HubServer = test_hub.server
        h = HubHarness(server)
        try:
            yield h
        finally:
            await h.close()


@pytest.fixture
async def storm_harness() -> AsyncIterator[HubHarness]:
    async with memory_hub(presence_linger=LINGER) as h:
        yield h


async def test_a_connect_storm_gives_everyone_the_roster_and_each_join_once(
    storm_harness: HubHarness,
) -> None:
    ids = [f"agent_{i:03d}" for i in range(STORM)]
    for agent_id in ids:
        await storm_harness.token(agent_id)
    loop = asyncio.get_running_loop()
    began = loop.time()
    trainers: list[RawTrainer] = await asyncio.gather(
        *(storm_harness.connect(a, hello(a, 1 + i % 8)) for i, a in enumerate(ids))
    )

    async def until_everyone(trainer: RawTrainer) -> None:
        await trainer.until_roster()
        while len(trainer.online) < STORM - 1:
            await trainer._read_one()

    await asyncio.wait_for(asyncio.gather(*(until_everyone(t) for t in trainers)), WAIT * 3)
    elapsed = loop.time() - began
    for trainer in trainers:
        others = set(ids) - {trainer.agent_id}
        assert set(trainer.online) == others
        assert trainer.welcome.roster_size == sum(
            len(u.online) for u in trainer.presence[: _roster_end(trainer) + 1]
        )
        # Each other agent came to it once: in its roster or as a change, never both.
        told = Counter(a.agent_id for u in trainer.presence for a in u.online)
        assert set(told.values()) == {1}, trainer.agent_id
        assert not any(u.offline for u in trainer.presence)
        # With the right specialization, as said in Hello.
        assert all(
            a.specialization == 1 + ids.index(a.agent_id) % 8 for a in trainer.online.values()
        )
        # Coalesced: after the roster, at most one update per linger, not one per join.
        changes = len(trainer.presence) - _roster_end(trainer) - 1
        assert changes <= elapsed / LINGER + 1, (changes, elapsed)
        assert trainer.events == []  # presence is not in the log
    total_changes = sum(len(t.presence) for t in trainers)
    assert total_changes < STORM * (STORM - 1) / 10, total_changes


def _roster_end(trainer: RawTrainer) -> int:
    return next(i for i, u in enumerate(trainer.presence) if u.roster_complete)


async def test_a_reconnect_that_changes_nothing_announces_nothing(harness: HubHarness) -> None:
    first = await harness.connect("AI_Node_1")
    second = await harness.connect("AI_Node_2")
    await first.joined("AI_Node_2")
    # A newer stream supersedes the live one with the same details: no change to tell.
    again = await harness.connect("AI_Node_2")
    await again.until_roster()
    assert list(again.online) == ["AI_Node_1"]
    # A marker: the next change reaches the first agent after any about AI_Node_2.
    await harness.connect("AI_Node_3")
    await first.joined("AI_Node_3")
    about_2 = [u for u in first.presence if any(a.agent_id == "AI_Node_2" for a in u.online)]
    assert len(about_2) == 1
    assert not any("AI_Node_2" in u.offline for u in first.presence)
    # Details that change are told.
    changed = hello("AI_Node_2", pb.SPECIALIZATION_GRAPHICS, capabilities=["graphics_rendering"])
    await harness.connect("AI_Node_2", changed)
    while first.online["AI_Node_2"].specialization != pb.SPECIALIZATION_GRAPHICS:
        await first._read_one()
    assert list(first.online["AI_Node_2"].capabilities) == ["graphics_rendering"]
    del second


async def test_presence_follows_the_subscription(harness: HubHarness) -> None:
    quiet = await harness.connect(
        "quiet",
        hello("quiet", subscription=pb.Subscription(event_kinds=[pb.EVENT_KIND_ARTIFACTS])),
    )
    assert quiet.welcome.roster_size == 0
    other = await harness.connect("other")
    # A marker after the join: an artifact, which quiet does follow.
    shared = await other.receipt(await other.send(share_pattern=pb.SharePattern(pattern=pattern())))
    await quiet.until_seq(shared.seq)
    assert quiet.presence == []
    # Subscribing to presence sends the roster, then changes.
    presence = pb.Subscription(event_kinds=[pb.EVENT_KIND_PRESENCE])
    await quiet.receipt(await quiet.send(subscribe=pb.Subscribe(subscription=presence)))
    await quiet.until_roster()
    assert list(quiet.online) == ["other"]
    await other.close()
    await quiet.left("other")
    assert quiet.online == {}


async def test_a_roster_larger_than_one_response_comes_in_pages() -> None:
    """Roster pages keep to the response budget: here 256 KiB, and ~700 KiB of roster."""
    limit = 256 * 1024
    caps = [f"capability_{i:02d}_{'x' * 40}" for i in range(64)]  # ~3.5 KiB per agent
    ids = [f"big_{i:03d}" for i in range(200)]
    async with memory_hub(max_message_bytes=limit) as h:
        for agent_id in ids:
            await h.token(agent_id)
        await asyncio.gather(*(h.connect(a, hello(a, capabilities=caps)) for a in ids))
        late = await h.connect("late")
        await late.until_roster()
        assert set(late.online) == set(ids)
        assert late.welcome.roster_size == len(ids)
        assert len(late.presence) >= 3
        assert all(u.ByteSize() <= limit for u in late.presence)
        assert [u.roster_complete for u in late.presence][-1]
        assert not any(u.roster_complete for u in late.presence[:-1])


class Woken:
    """A follower that notes when presence woke it."""

    def __init__(self) -> None:
        self.at: list[float] = []
        self.event = asyncio.Event()

    def presence_ready(self) -> None:
        self.at.append(asyncio.get_running_loop().time())
        self.event.set()


async def test_a_burst_of_changes_wakes_followers_once_after_a_pause() -> None:
    """Followers are woken once per pause however many changes came; the pause is the
    linger, or the write budget's share per follower if longer."""
    loop = asyncio.get_running_loop()
    presence = Presence(linger=0.25, writes_per_second=10.0)
    followers = [Woken() for _ in range(5)]  # 5 followers at 10 writes/s: 0.5 s apart
    for follower in followers:
        presence.follow(follower)
    before = loop.time()
    for i in range(20):
        presence.online(pb.AgentInfo(agent_id=f"agent_{i}", version="1"))
    assert presence._tick is not None  # one wake-up for the burst, not one per change
    assert presence._tick.when() - before == pytest.approx(0.5, abs=0.05)
    presence._tick.cancel()


async def test_a_busy_hub_puts_presence_off_until_it_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the hub is busy, a wake-up that falls due waits (half a pause at a time), so a
    storm's presence writes give way to the joins themselves; the first check that finds
    the hub no longer busy wakes every follower, once."""
    monkeypatch.setattr(presence_module, "BUSY_PAUSES", 10_000)  # the bound is not the test
    loop = asyncio.get_running_loop()
    readings = [1.0, 0.9, 0.0]  # busy at the pause's end and half a pause later; then not
    asked: list[float] = []

    def busy() -> float:
        asked.append(loop.time())
        return readings[len(asked) - 1]

    presence = Presence(linger=0.02, writes_per_second=1e9, busy=busy)
    followers = [Woken() for _ in range(3)]
    for follower in followers:
        presence.follow(follower)
    start = loop.time()
    for i in range(5):
        presence.online(pb.AgentInfo(agent_id=f"agent_{i}", version="1"))
    await asyncio.wait_for(asyncio.gather(*(f.event.wait() for f in followers)), 10)
    assert len(asked) == 3  # woken at the third check, the first that found it not busy
    assert all(len(f.at) == 1 for f in followers)  # once each
    # The pause, then two half-pauses (timers never fire early, but for the clock's grain).
    assert followers[0].at[0] >= start + 0.02 + 2 * 0.01 - 1e-6
    assert asked[1] - asked[0] >= 0.01 - 1e-6 and asked[2] - asked[1] >= 0.01 - 1e-6


@pytest.mark.parametrize(
    ("joining", "pause"), [(0, 0.02), (4, 0.05)], ids=["same-followers", "storm-followers"]
)
async def test_a_hub_busy_throughout_still_wakes_followers_within_a_bound(
    joining: int, pause: float
) -> None:
    """However long the hub stays busy, followers are woken after at most BUSY_PAUSES
    pauses more than the pause: each change still reaches each of them. The pauses are
    counted as the followers now make them: followers that come while the wake-up waits (a
    connect storm's) lengthen the bound, so a long storm is not cut short by a bound its
    first join set."""
    loop = asyncio.get_running_loop()
    presence = Presence(linger=0.02, writes_per_second=100.0, busy=lambda: 1.0)
    follower = Woken()
    presence.follow(follower)
    start = loop.time()
    presence.online(pb.AgentInfo(agent_id="agent_1", version="1"))
    for _ in range(joining):  # 5 followers at 100 writes/s: a pause of 0.05 s
        presence.follow(Woken())
    await asyncio.wait_for(follower.event.wait(), 10)
    assert follower.at[0] - start >= pause * (1 + BUSY_PAUSES) - pause / 2 - 1e-3
    assert presence._tick is None and len(follower.at) == 1


@pytest.mark.parametrize("row_first", [False, True], ids=["shown-first", "row-first"])
async def test_an_agent_that_moved_here_is_not_kept_online_by_the_other_replica_s_word(
    row_first: bool,
) -> None:
    """Replica presence: an agent carried elsewhere reconnects here. Once the shared row says
    this replica carries it, what the other replica said is stale: when the stream here ends
    (and its AgentOffline failed, so no row says offline) the agent is offline here; and the
    move itself told nobody anything, whichever of the row and the stream came first."""
    presence = Presence(linger=0.0)
    agent = pb.AgentInfo(
        agent_id="AI_Node_m", specialization=pb.SPECIALIZATION_FILE_SYSTEM, version="1"
    )
    presence.remote("AI_Node_m", agent)  # carried by another replica
    moved = presence.version
    if row_first:
        presence.carried_here("AI_Node_m")  # the row, before the stream here shows it
        presence.online(agent)
    else:
        presence.online(agent)
        presence.carried_here("AI_Node_m")
    assert presence.version == moved and presence.get("AI_Node_m") == agent
    presence.offline("AI_Node_m")
    assert presence.get("AI_Node_m") is None
    assert [e.info for e in presence.since(moved, 10) or []] == [None]


async def test_a_newer_word_from_another_replica_outranks_a_stale_mark() -> None:
    """Marked as moved here before its stream showed it, then carried elsewhere again: the
    other replica's newer word stands when the stream here ends."""
    presence = Presence(linger=0.0)
    agent = pb.AgentInfo(
        agent_id="AI_Node_m", specialization=pb.SPECIALIZATION_FILE_SYSTEM, version="1"
    )
    presence.remote("AI_Node_m", agent)
    presence.carried_here("AI_Node_m")
    presence.remote("AI_Node_m", agent)  # a later row: another replica carries it again
    presence.online(agent)
    presence.offline("AI_Node_m")
    assert presence.get("AI_Node_m") == agent


async def test_a_disconnect_whose_agent_offline_failed_is_tried_again(
    harness: HubHarness, database_url: str
) -> None:
    """The database refuses the AgentOffline of a stream's end (a trigger here; a database
    down or too slow in life): the hub tries it again, in the background, until it commits;
    else the agent would stay online for as long as the hub runs."""
    trainer = await harness.connect("AI_Node_r")
    path = database_url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TRIGGER refuse_offline BEFORE UPDATE OF online ON agent WHEN NEW.online = 0 "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
        db.commit()
        await trainer.close()
        sessions = harness.server.servicer.sessions

        async def failed_once() -> None:  # the first AgentOffline failed: a retry waits
            while not sessions._retries:  # noqa: ASYNC110 (the hub's own state)
                await asyncio.sleep(0.01)

        await asyncio.wait_for(failed_once(), WAIT)
        online = "SELECT online FROM agent WHERE agent_id = 'AI_Node_r'"
        assert db.execute(online).fetchone() == (1,)
        db.execute("DROP TRIGGER refuse_offline")
        db.commit()

        async def offline() -> None:
            while db.execute(online).fetchone() != (0,):  # noqa: ASYNC110 (the database)
                await asyncio.sleep(0.05)

        await asyncio.wait_for(offline(), WAIT)

    async def retry_ended() -> None:
        while sessions._retries:  # noqa: ASYNC110 (the hub's own state)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(retry_ended(), WAIT)

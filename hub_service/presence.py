"""Presence: who is online, as state (not the event log): the roster, and a bounded log of
its changes that every following stream reads from its own cursor.

A change costs one append, whoever follows; followers are woken once per linger however
many changes came meanwhile, so a burst of joins costs each stream a few writes. A stream
too far behind the log's tail gets the roster again instead.

Replicas on one PostgreSQL (`replica.LogFollower`) add the agents whose streams the other
replicas carry (`remote`), as the shared agent rows tell; an agent is online here if either
source says so, with this replica's own word first. Each source changes only on its own
authority (a local stream's start and end; a row read back), so no order in which the two
arrive leaves the roster wrong, and an agent moving between replicas with the same details
is no change at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from generated.kernelhub.v1 import hub_pb2 as pb

# Changes kept for followers that are behind; one further behind gets the roster again.
LOG_SIZE = 16384
# While the hub is busy (`busy()` at BUSY or over), a wake-up that falls due is put off, half
# a pause at a time, until BUSY_PAUSES pauses more have passed since the first change it
# carries (the pause as the followers now make it: a storm's joins lengthen it): the writes
# presence costs (one per follower) give way to the work that made the hub busy, such as a
# connect storm's joins, and go out as soon as it is not.
BUSY = 0.5
BUSY_PAUSES = 4


class Entry(NamedTuple):
    """An agent as presence tells it: `info` None once it went offline; `wire` its encoding
    as a `PresenceUpdate` field (online or offline), serialized once for every stream that
    gets it (a response's update is the concatenation of its entries' bytes); `cost` its
    length."""

    agent_id: str
    info: pb.AgentInfo | None
    wire: bytes
    cost: int

    @classmethod
    def of(cls, agent_id: str, update: pb.PresenceUpdate, info: pb.AgentInfo | None) -> Entry:
        wire = update.SerializeToString()
        return cls(agent_id, info, wire, len(wire))


class Follower(Protocol):
    def presence_ready(self) -> None:
        """Changes wait in the log for this follower."""


def same(a: pb.AgentInfo, b: pb.AgentInfo) -> bool:
    """Whether two announcements tell the same (the time does not count)."""
    return (
        a.specialization == b.specialization
        and list(a.capabilities) == list(b.capabilities)
        and a.version == b.version
    )


class Presence:
    def __init__(
        self,
        linger: float,
        writes_per_second: float = 2000.0,
        log_size: int = LOG_SIZE,
        busy: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._linger = linger
        self._busy = busy
        # Each wake-up costs one write per follower: with many followers they wake less
        # often (and each write carries more), so a storm of joins cannot fill the loop.
        self._writes_per_second = writes_per_second
        self._log_size = log_size
        self._online: dict[str, Entry] = {}
        # Its sources: this hub's streams, and (replicas) the others' as last read.
        self._local: dict[str, pb.AgentInfo] = {}
        self._remote: dict[str, pb.AgentInfo] = {}
        # Agents whose `_remote` entry is stale (the shared row says this replica carries
        # them now), dropped as soon as the local stream shows them: at most one per stream.
        self._moved_here: set[str] = set()
        self._log: list[Entry] = []
        self._base = 0  # the version of _log[0]: change n is _log[n - _base]
        self._followers: dict[Follower, None] = {}
        self._tick: asyncio.TimerHandle | None = None
        self._first_change = 0.0  # (loop time) the first change the pending wake-up carries

    @property
    def version(self) -> int:
        """Changes so far: a follower that has read up to it has seen everything."""
        return self._base + len(self._log)

    def __len__(self) -> int:
        return len(self._online)

    def get(self, agent_id: str) -> pb.AgentInfo | None:
        entry = self._online.get(agent_id)
        return entry.info if entry is not None else None

    def entry(self, agent_id: str) -> Entry | None:
        return self._online.get(agent_id)

    def roster(self) -> list[Entry]:
        """Everyone online now, oldest announcement first."""
        return list(self._online.values())

    def since(self, cursor: int, limit: int) -> Sequence[Entry] | None:
        """At most `limit` changes after `cursor`, in order; None if the log no longer holds
        them all."""
        if cursor < self._base:
            return None
        start = cursor - self._base
        return self._log[start : start + limit]

    def follow(self, follower: Follower) -> None:
        self._followers[follower] = None

    def unfollow(self, follower: Follower) -> None:
        self._followers.pop(follower, None)

    def online(self, agent: pb.AgentInfo) -> None:
        """`agent`'s stream here came online; announced unless it already was, with the
        same details."""
        self._local[agent.agent_id] = agent
        if agent.agent_id in self._moved_here:
            self._moved_here.discard(agent.agent_id)
            self._remote.pop(agent.agent_id, None)
        self._show(agent)

    def offline(self, agent_id: str) -> None:
        """`agent_id`'s stream here ended: offline, unless another replica carries it."""
        self._moved_here.discard(agent_id)
        if self._local.pop(agent_id, None) is not None:
            self._settle(agent_id)

    def carried_here(self, agent_id: str) -> None:
        """The shared row says this replica carries `agent_id` now: what another replica
        said of it is stale, and must not keep it online once the stream here ends. Dropped
        now if the stream here shows it; else once it does (dropped before, the stream's
        join would be told as a leave and a join)."""
        if agent_id in self._local:
            self._remote.pop(agent_id, None)
        elif agent_id in self._remote:
            self._moved_here.add(agent_id)

    def remote(self, agent_id: str, agent: pb.AgentInfo | None) -> None:
        """What the shared rows say of an agent carried elsewhere (None: by no other)."""
        self._moved_here.discard(agent_id)  # a newer word than the stale one
        if agent is None:
            if self._remote.pop(agent_id, None) is not None:
                self._settle(agent_id)
            return
        self._remote[agent_id] = agent
        if agent_id not in self._local:
            self._show(agent)

    def _settle(self, agent_id: str) -> None:
        agent = self._local.get(agent_id) or self._remote.get(agent_id)
        if agent is not None:
            self._show(agent)
        elif self._online.pop(agent_id, None) is not None:
            self._change(Entry.of(agent_id, pb.PresenceUpdate(offline=[agent_id]), None))

    def _show(self, agent: pb.AgentInfo) -> None:
        before = self._online.pop(agent.agent_id, None)  # re-inserted last: roster order
        entry = Entry.of(agent.agent_id, pb.PresenceUpdate(online=[agent]), agent)
        self._online[agent.agent_id] = entry
        if before is None or before.info is None or not same(before.info, agent):
            self._change(entry)

    def _change(self, entry: Entry) -> None:
        self._log.append(entry)
        if len(self._log) > self._log_size:
            dropped = len(self._log) // 2
            del self._log[:dropped]
            self._base += dropped
        if self._tick is None:
            loop = asyncio.get_running_loop()
            self._first_change = loop.time()
            self._tick = loop.call_later(self._pause(), self._due)

    def _pause(self) -> float:
        """The linger, or the write budget's share per follower if longer."""
        return max(self._linger, len(self._followers) / self._writes_per_second)

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        pause = self._pause()
        step = pause / 2
        latest = self._first_change + pause * (1 + BUSY_PAUSES)
        if self._busy() >= BUSY and loop.time() + step <= latest:
            self._tick = loop.call_later(step, self._due)
            return
        self._wake()

    def _wake(self) -> None:
        """Once per pause: every follower reads what came meanwhile."""
        self._tick = None
        for follower in self._followers:
            follower.presence_ready()

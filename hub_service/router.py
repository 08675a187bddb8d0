"""Fan-out: hands each committed event to the live connections entitled to it, and each
change of presence to the connections that follow presence.

This is the one seam between "committed" and "delivered". One hub feeds it from
its committer; replicas on one PostgreSQL feed it from the shared event log
(`replica.LogFollower`), in the same seq order; connections do not change.

Connections are indexed by their subscription, per broadcast kind, under one of its terms
(a contributor, else a specialization, else an artifact kind, else "all of the kind"): an
event is offered to the connections indexed under its own terms, each checked against its
whole filter. The cost of an event grows with the connections that may want it, not with
every connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from generated.kernelhub.v1 import hub_pb2 as pb

from .outcomes import Outcome
from .presence import Presence
from .subscriptions import ARTIFACTS, BROADCAST_KINDS, Filter, Tags
from .wire import EventWires

if TYPE_CHECKING:
    from .connection import Connection

Key = tuple[str, object]  # ("all", None), ("contributor", id), ("spec", n), ("artifact", n)


def _keys(subscription: Filter, kind: int) -> list[Key]:
    """The index keys a subscription is filed under for `kind` (none: it wants none)."""
    if not subscription.wants(kind):
        return []
    if subscription.contributors:
        return [("contributor", c) for c in sorted(subscription.contributors)]
    if subscription.spec_mask:
        return [("spec", s) for s in range(1, 64) if subscription.spec_mask & (1 << s)]
    if kind == ARTIFACTS and subscription.artifact_kinds:
        return [("artifact", a) for a in sorted(subscription.artifact_kinds)]
    return [("all", None)]


def _event_keys(tags: Tags) -> Iterator[Key]:
    yield ("all", None)
    yield ("contributor", tags.contributor)
    mask = tags.spec_mask
    spec = 0
    while mask:
        if mask & 1:
            yield ("spec", spec)
        mask >>= 1
        spec += 1
    if tags.kind == ARTIFACTS:
        yield ("artifact", tags.artifact_kind)


class Router:
    def __init__(self, presence: Presence) -> None:
        self._connections: dict[str, Connection] = {}
        # Watch streams: every event, whoever it is for; not agents, so never online.
        self._watchers: set[Connection] = set()
        # kind -> index key -> connections filed under it (insertion-ordered, as sets of
        # keys of a dict, so fan-out order is stable).
        self._index: dict[int, dict[Key, dict[Connection, None]]] = {
            kind: {} for kind in BROADCAST_KINDS
        }
        # Who is online, as presence tells it: AgentOnline committed, the stream not ended.
        self.presence = presence
        self._by_specialization: dict[int, dict[Connection, None]] = {}
        # Highest seq handed out; every event up to it is committed.
        self.last_published_seq = 0
        # Each event's wire encoding, made once for every stream that carries it.
        self.wires = EventWires()
        # A commit's outcome is unknown (it may have landed unpublished): until the next
        # event is published, the head may understate the log.
        self.in_doubt = False

    # --- connections and their subscriptions ----------------------------------

    def attach(self, connection: Connection) -> Connection | None:
        """Make `connection` the agent's live one; returns the one it supersedes."""
        old = self._connections.get(connection.agent_id)
        if old is not None:
            self._unindex(old)
            self._by_specialization.get(old.hello.specialization, {}).pop(old, None)
        self._connections[connection.agent_id] = connection
        self._by_specialization.setdefault(connection.hello.specialization, {})[connection] = None
        self._file(connection)
        if self.in_doubt:
            connection.resync()
        return old

    def detach(self, connection: Connection) -> bool:
        """Forget `connection`; False if a newer one had already superseded it."""
        if self._connections.get(connection.agent_id) is connection:
            del self._connections[connection.agent_id]
            self._unindex(connection)
            self._by_specialization.get(connection.hello.specialization, {}).pop(connection, None)
            return True
        return False

    def resubscribe(self, connection: Connection, subscription: Filter) -> int:
        """Switch a live connection to `subscription`; returns the seq it takes effect
        after (`Connection.resubscribe`)."""
        attached = self._connections.get(connection.agent_id) is connection
        followed = connection.subscription.presence
        if attached:
            self._unindex(connection)
        at = connection.resubscribe(subscription, self.last_published_seq)
        if attached:
            self._file(connection)
            if subscription.presence and self.presence.get(connection.agent_id) is not None:
                self.presence.follow(connection)
                if not followed:
                    connection.start_roster(self.presence)
        return at

    def _file(self, connection: Connection) -> None:
        for kind, index in self._index.items():
            for key in _keys(connection.subscription, kind):
                index.setdefault(key, {})[connection] = None

    def _unindex(self, connection: Connection) -> None:
        self.presence.unfollow(connection)
        for kind, index in self._index.items():
            for key in _keys(connection.subscription, kind):
                filed = index.get(key)
                if filed is not None:
                    filed.pop(connection, None)
                    if not filed:
                        del index[key]

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self._connections

    def connection(self, agent_id: str) -> Connection | None:
        """The agent's live connection here, if any."""
        return self._connections.get(agent_id)

    def connections(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))

    def watch(self, watcher: Connection, presence: bool) -> None:
        """A Watch stream: every event, and (with `presence`) the roster, then its changes."""
        self._watchers.add(watcher)
        if self.in_doubt:
            watcher.resync()
        if presence:
            watcher.start_roster(self.presence)
            self.presence.follow(watcher)

    def unwatch(self, watcher: Connection) -> None:
        self._watchers.discard(watcher)
        self.presence.unfollow(watcher)

    def watchers(self) -> Iterator[Connection]:
        return iter(list(self._watchers))

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    def sample(self, limit: int) -> list[Connection]:
        """The first `limit` live connections (the oldest), at the cost of `limit`."""
        return list(itertools.islice(self._connections.values(), limit))

    def sample_by_specialization(self, limit: int) -> dict[int, list[Connection]]:
        """The first `limit` live connections of each specialization."""
        return {
            spec: list(itertools.islice(connections, limit))
            for spec, connections in self._by_specialization.items()
            if connections
        }

    def __len__(self) -> int:
        return len(self._connections)

    # --- presence -----------------------------------------------------------------

    def came_online(self, connection: Connection, agent: pb.AgentInfo) -> None:
        """`connection`'s AgentOnline committed: it gets the roster (if it follows presence),
        the others the change, unless a stream it superseded had announced the same."""
        if self._connections.get(connection.agent_id) is not connection:
            return  # already superseded or gone
        agent.online = True
        if connection.subscription.presence:
            connection.start_roster(self.presence)  # everyone before it; then the log
            self.presence.follow(connection)
        self.presence.online(agent)

    def went_offline(self, agent_id: str) -> None:
        """The agent's live stream ended (and no newer one took over)."""
        self.presence.offline(agent_id)

    # --- events ---------------------------------------------------------------------

    def resync(self) -> None:
        """A commit failed in a way that may still have committed: every connection reads
        the log again rather than trust that it saw every event; so do streams attached
        before the next event is published (what landed may lie above the head)."""
        self.in_doubt = True
        for connection in (*self._connections.values(), *self._watchers):
            connection.resync()

    def publish(self, outcome: Outcome) -> None:
        if outcome.events:
            self.in_doubt = False  # its commit read the log's true head first
        for routed in outcome.events:
            event = routed.event
            self.last_published_seq = max(self.last_published_seq, event.seq)
            for watcher in self._watchers:
                watcher.offer(event)
            if routed.recipients is None:
                interested = self._interested(routed.tags)
                for connection in interested:
                    if connection.agent_id != event.sender_id:
                        connection.offer(event)
                if routed.tags.also_to:  # rare (a verdict): the set costs nothing otherwise
                    offered = {c.agent_id for c in interested if c.agent_id != event.sender_id}
                    for agent_id in routed.tags.also_to - offered:
                        if (recipient := self._connections.get(agent_id)) is not None:
                            recipient.offer(event)
            else:
                for agent_id in routed.recipients:
                    if (recipient := self._connections.get(agent_id)) is not None:
                        recipient.offer(event)

    def _interested(self, tags: Tags) -> Iterable[Connection]:
        """The connections whose subscription matches `tags`, each once."""
        index = self._index.get(tags.kind)
        if index is None:
            return ()
        filed = [c for key in _event_keys(tags) if (c := index.get(key))]
        if len(filed) == 1:
            return [c for c in filed[0] if c.subscription.matches(tags)]
        seen: dict[Connection, None] = {}
        for connections in filed:
            for connection in connections:
                if connection not in seen and connection.subscription.matches(tags):
                    seen[connection] = None
        return seen

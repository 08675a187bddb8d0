"""Fan-out: hands each committed event to the live connections entitled to it.

This is the one seam between "committed" and "delivered". One hub feeds it from
its committer; replicas on one PostgreSQL feed it from the shared event log
(`replica.LogFollower`), in the same seq order; connections do not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from .outcomes import Outcome

if TYPE_CHECKING:
    from .connection import Connection


class Router:
    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}
        # Highest seq handed out; every event up to it is committed.
        self.last_published_seq = 0

    def attach(self, connection: Connection) -> Connection | None:
        """Make `connection` the agent's live one; returns the one it supersedes."""
        old = self._connections.get(connection.agent_id)
        self._connections[connection.agent_id] = connection
        return old

    def detach(self, connection: Connection) -> bool:
        """Forget `connection`; False if a newer one had already superseded it."""
        if self._connections.get(connection.agent_id) is connection:
            del self._connections[connection.agent_id]
            return True
        return False

    def is_connected(self, agent_id: str) -> bool:
        return agent_id in self._connections

    def connection(self, agent_id: str) -> Connection | None:
        """The agent's live connection here, if any."""
        return self._connections.get(agent_id)

    def connections(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))

    def __len__(self) -> int:
        return len(self._connections)

    def resync(self) -> None:
        """A commit failed in a way that may still have committed: every connection reads
        the log again rather than trust that it saw every event."""
        for connection in self._connections.values():
            connection.resync()

    def publish(self, outcome: Outcome) -> None:
        for routed in outcome.events:
            event = routed.event
            self.last_published_seq = max(self.last_published_seq, event.seq)
            if routed.recipients is None:
                for agent_id, connection in self._connections.items():
                    if agent_id != event.sender_id:
                        connection.offer(event)
            else:
                for agent_id in routed.recipients:
                    if (recipient := self._connections.get(agent_id)) is not None:
                        recipient.offer(event)

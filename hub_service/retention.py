"""Retention: prunes the event log (with its recipients) and the idempotency ledger by age
and size, in bounded batches, and knows the log's low-water mark (the oldest seq it holds).

Artifacts, collaborations and feature requests are never pruned: they are the knowledge
base, which a newcomer reads through the training sync and the query RPCs.

The rule for events: one is pruned only if it is older than `event_retention` or beyond the
newest `event_retention_max_events`, AND no connected trainer still reads it from the log: a
slow reader that fell back to reading the log, or a replay in progress, pins every event after
its cursor (the highest seq it has queued or sent); a live connection pins nothing, since every
event it is entitled to up to the last published one is already in its queue (should it fall
behind later, it does so in the router's loop turn, and then pins). The newest event is always
kept (it carries the head across restarts). So that one slow reader cannot keep the log growing,
a reader more than `retention_max_reader_lag` events behind the head that holds pruning back is
ended with RESOURCE_EXHAUSTED (nothing it was sent is lost; it may reconnect and resume, or get
OUT_OF_RANGE and start afresh).

The race with a newcomer is closed on the event loop: a round reads what is old enough, then,
in one loop turn, takes the connections' cursors and raises `oldest_seq` before it deletes.
A Hello is checked against `oldest_seq` and attached in one loop turn too (`session.py`):
either the round sees the newcomer's cursor, or the newcomer sees the raised mark and is
refused with OUT_OF_RANGE instead of missing events.

Replicas on one PostgreSQL: each raises its own mark by the same rule (its follower's
position counts as the head, so what it has yet to route is kept) and publishes it with its
lease (`leases.py`); only the leader deletes, and never past the lowest mark of the live
replicas, read in the deleting transaction under the log's lock (`sql_write.PruneEvents`),
under which a replica that starts reads where the log begins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc

from .config import HubConfig
from .models import utcnow
from .router import Router
from .state import HubStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """What is kept: ages in seconds (0: forever), a count of events (0: no limit)."""

    event_max_age: float = 0.0
    max_events: int = 0
    ledger_max_age: float = 0.0
    batch_size: int = 5000
    max_reader_lag: int = 0  # 0: a slow reader is never ended for holding pruning back

    @classmethod
    def of(cls, config: HubConfig) -> RetentionPolicy:
        return cls(
            config.event_retention,
            config.event_retention_max_events,
            config.ledger_retention,
            config.retention_batch_size,
            config.retention_max_reader_lag,
        )


class Retention:
    """The low-water mark, and the pruning rounds (`run`, every `retention_interval`)."""

    def __init__(
        self,
        store: HubStore,
        router: Router,
        policy: RetentionPolicy,
        leader: Callable[[], bool] | None = None,
    ) -> None:
        self._store = store
        self._router = router
        self.policy = policy
        # Replicas: whether this one leads (it alone deletes); None for a single hub.
        self._leader = leader
        # The oldest seq a resume may need: every event from it on is held (1: none pruned).
        self.oldest_seq = 1
        self.events_pruned = 0  # since the hub started, for logs and tests
        self.ledger_pruned = 0

    async def load(self) -> None:
        """At start: where the log begins."""
        self.oldest_seq = await self._store.oldest_seq()

    def refuses(self, resume_after_seq: int) -> bool:
        """Whether a resume after this seq needs events already pruned (0 is a fresh start,
        which begins at the oldest event held)."""
        return 0 < resume_after_seq < self.oldest_seq - 1

    def refusal(self, field: str, after_seq: int) -> str | None:
        """The OUT_OF_RANGE message for a stream asking for events after `after_seq` (its
        `field`), or None when the log still holds them."""
        if not self.refuses(after_seq):
            return None
        return (
            f"{field} {after_seq} is below the event log's low-water mark: the oldest seq "
            f"still held is {self.oldest_seq} (older events were pruned); start afresh with "
            "skip_history and read the knowledge base"
        )

    async def run(self) -> None:
        """One round: events, then the ledger, a batch at a time until nothing is due. Each
        batch is its own short transaction in the writer, so commits go on between them."""
        events = ledger = 0
        while (pruned := await self._prune_events()) > 0:
            events += pruned
        if self.policy.ledger_max_age > 0 and (self._leader is None or self._leader()):
            older_than = utcnow() - timedelta(seconds=self.policy.ledger_max_age)
            while (
                forgotten := await self._store.prune_ledger(older_than, self.policy.batch_size)
            ) > 0:
                ledger += forgotten
        self.events_pruned += events
        self.ledger_pruned += ledger
        if events or ledger:
            log.info(
                "retention: pruned %d events (the log now starts at seq %d) and %d message ids",
                events,
                self.oldest_seq,
                ledger,
            )

    async def _prune_events(self) -> int:
        policy, store = self.policy, self._store
        head = self._router.last_published_seq
        due = 0
        if policy.max_events > 0 and head - policy.max_events > 0:
            due = await store.prunable_through(head - policy.max_events, None, policy.batch_size)
        if policy.event_max_age > 0:
            older_than = utcnow() - timedelta(seconds=policy.event_max_age)
            aged = await store.prunable_through(head - 1, older_than, policy.batch_size)
            due = max(due, aged)
        # From here to the raise of the mark: one loop turn (no await), see the docstring.
        head = self._router.last_published_seq
        pinned = head
        for connection in (*self._router.connections(), *self._router.watchers()):
            pin = connection.reads_log_after
            if pin is None or pin >= due or connection.ended.is_set():
                continue  # live, not in the way, or being torn down (owed nothing more)
            if policy.max_reader_lag and head - pin > policy.max_reader_lag:
                # It holds pruning back that far: end it (it may resume, or start afresh).
                connection.end(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this stream fell {head - pin} events behind the event log's head (at most "
                    f"{policy.max_reader_lag} while the log is due for pruning); reconnect",
                )
                continue
            pinned = min(pinned, pin)
        through = min(due, pinned, head - 1)
        if self._leader is None:  # one hub
            if through < self.oldest_seq:
                return 0
            self.oldest_seq = through + 1
            return await store.prune_events(through)
        # A replica raises its own mark (published with its lease); the leader deletes up
        # to its own, no further than every live replica's, a batch at a time.
        self.oldest_seq = max(self.oldest_seq, through + 1)
        if not self._leader():
            return 0
        return await store.prune_events(self.oldest_seq - 1, policy.batch_size)

"""Replica mode: the router is fed from the shared event log in `seq` order, whichever replica
committed; LISTEN/NOTIFY wakes the reader, and a periodic read bounds a lost notification.

Several hubs on one PostgreSQL allocate `seq` under one advisory lock (`sql_write`), so the
log's order is the commit order hub-wide and no seq ever commits below one already visible.
This module delivers that log: it keeps the highest seq it has routed (`published`) and
routes each event after it exactly once, in order. Local outcomes come from the committer
(no read needed when nothing came between); events committed by other replicas are read
back from the log (`SqlStore.log_after`). A local answer (the receipt) waits until every
event before it is routed, so a trainer's receipt still never precedes its events.

It also follows presence, which is state, not in the log: each change of an agent row
(AgentOnline, AgentOffline, a dead replica's agents marked offline) takes the next presence
revision under the log's lock and NOTIFYs `kernelhub_presence`; the follower reads the rows
changed after the last revision it has (`SqlStore.presence_after`, in pages), on a
notification and every catch-up interval, so a lost one costs latency. The agents other
replicas carry go into `Presence.remote`: every replica's roster and presence changes are
hub-wide. The same rows carry "one live stream per agent": an agent that came online on
another replica later than its local stream did connected again there, and the local stream
ends with ABORTED (without marking the agent offline).

It routes only while this replica holds its lease (`holds`): a replica whose lease ran out
may have been dropped from the replicas that bound pruning, and what it reads may have holes.
The log's seqs are dense (each batch allocates its seqs after the head it reads under the
log's lock, and commits them all or none), so a read after `published` that does not begin
at `published + 1` means events it still owed were deleted: it says so (`on_gap`, which
ends every stream as a lost lease does) instead of skipping them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb

from .errors import StatusError
from .outcomes import Outcome, RoutedEvent
from .ratelimit import ThrottledLog
from .router import Router
from .sql_write import LOG_CHANNEL, PRESENCE_CHANNEL, parse_notify

if TYPE_CHECKING:
    from .sql_store import SqlStore

log = logging.getLogger(__name__)
_TROUBLE = ThrottledLog(log, 10.0)

# Seconds before a lost LISTEN connection is opened again (the catch-up read goes on).
LISTEN_RETRY_SECONDS = 1.0
SUPERSEDED_ELSEWHERE = "superseded by a newer connection for this agent (on another replica)"
# Agent rows per presence read.
PRESENCE_PAGE = 500


class LogFollower:
    """Routes the shared log in seq order; `committed` is the committer's `Publish`."""

    def __init__(
        self,
        store: SqlStore,
        router: Router,
        *,
        interval: float,
        page_size: int,
        max_bytes: int,
        routed: Callable[[Outcome], None] = lambda _: None,
        holds: Callable[[], bool] = lambda: True,
        on_gap: Callable[[int], None] = lambda _: None,
    ) -> None:
        self._store = store
        self._holds = holds  # whether this replica's lease is surely live
        self._on_gap = on_gap  # events it owed were pruned: given the first seq it found
        self._routed = routed  # told of each outcome routed, local or not, in seq order
        assert store.shared is not None, "a replica's store shares the log"
        self._origin = store.shared.origin
        self._router = router
        self._interval = interval  # the catch-up read, whatever the notifications said
        self._page_size = page_size
        self._max_bytes = max_bytes  # one log read's byte budget
        self.published = 0  # every event up to it has been routed (or was before start)
        # Committed here, not yet routed: bounded by the committer's queue and batches.
        self._local: deque[tuple[Outcome, Callable[[], None]]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.listener: asyncio.Task[None] | None = None  # LISTEN's task (a test may end it)
        self._heard = 0  # the highest seq a notification named
        self.notifications = 0  # other replicas' NOTIFYs received, for tests and stats
        self.reads = 0  # log reads that routed something
        self.presence_rev = 0  # every agent row changed up to it has been read
        self._presence_wake = asyncio.Event()

    async def start(self, head: int) -> None:
        """Route what commits after `head` (the log's head when the hub started)."""
        self.published = self._router.last_published_seq = head
        await self._read_presence()  # the others' agents, before any newcomer's roster
        self.listener = asyncio.create_task(self._listen(), name="replica-listen")
        self._tasks = [
            asyncio.create_task(self._run(), name="replica-log"),
            asyncio.create_task(self._follow_presence(), name="replica-presence"),
            self.listener,
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Committed, so answered: the streams are ending, there is nobody left to route to.
        while self._local:
            _, answer = self._local.popleft()
            answer()

    def skip_to(self, oldest: int) -> None:
        """Its lease was lost and taken again, every stream ended: the log now begins at
        `oldest`, and what was pruned below it is owed to nobody here."""
        if self.published < oldest - 1:
            self.published = self._router.last_published_seq = oldest - 1
        self._wake.set()

    def committed(self, outcome: Outcome, answer: Callable[[], None]) -> None:
        """A local commit's outcome: routed (and answered) once every event before it is."""
        self._local.append((outcome, answer))
        self._wake.set()

    # --- the reader ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            timed_out = False
            try:
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            except TimeoutError:
                timed_out = True  # the catch-up read: a notification may have been lost
            self._wake.clear()
            try:
                await self._advance(read=timed_out)
            except StatusError as error:  # the database is down: the next round retries
                _TROUBLE.warning("replica: cannot read the shared log: %s", error.message)
            except Exception:
                log.exception("replica: routing the shared log failed")

    async def _follow_presence(self) -> None:
        """Its own task, so its reads never hold up routing (or receipts)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._presence_wake.wait()
            self._presence_wake.clear()
            try:
                await self._read_presence()
            except StatusError as error:  # the database is down: the next round retries
                _TROUBLE.warning("replica: cannot read presence: %s", error.message)
            except Exception:
                log.exception("replica: following presence failed")

    async def _advance(self, read: bool) -> None:
        """Route everything committed after `published`: local outcomes as they stand, the
        rest read back from the log, in seq order. The log is read when told to, when a
        notification names a seq not yet routed, or when a local commit waits behind seqs
        it does not have."""
        while self._holds():
            self._route_local()
            if not (read or self._local or self._heard > self.published):
                return
            events, read = await self._store.log_after(
                self.published, self._page_size, self._max_bytes
            )
            if not self._holds():
                return  # read while its lease ran out: the log may have a hole by now
            if events:
                self.reads += 1
                self._check_dense(events[0].event.seq)
                self._route(events)
                continue
            # A notification is sent at COMMIT, so what it named is in the log by now; only
            # the guess made on (re)opening LISTEN can name a seq not yet committed.
            self._heard = min(self._heard, self.published)
            if not self._local:
                return
            # Nothing in the log between `published` and a local commit: they were pruned.
            outcome, _ = self._local[0]
            if not outcome.events:
                continue  # committed during the read, with no events: answered at once
            first = min(r.event.seq for r in outcome.events)
            self._check_dense(first)
            self.published = first - 1

    def _check_dense(self, first: int) -> None:
        """The next seq found after `published` is `first`: any seq between was pruned,
        though this replica's readers still needed it (its lease ran out meanwhile)."""
        if first > self.published + 1:
            log.warning(
                "replica: seqs %d..%d were pruned before it routed them (its lease ran out)",
                self.published + 1,
                first - 1,
            )
            self._on_gap(first)

    def _route_local(self) -> None:
        """Route (and answer) the local outcomes that come next in seq order."""
        while self._local:
            outcome, answer = self._local[0]
            if outcome.events and min(r.event.seq for r in outcome.events) > self.published + 1:
                return  # another replica's events come first
            self._local.popleft()
            fresh = [r for r in outcome.events if r.event.seq > self.published]
            if fresh:
                self._route(fresh)
            answer()

    def _route(self, events: list[RoutedEvent]) -> None:
        fresh = [r for r in events if r.event.seq > self.published]
        if not fresh:
            return
        outcome = Outcome(events=fresh)
        self._routed(outcome)
        self._router.publish(outcome)
        self.published = max(self.published, fresh[-1].event.seq)

    # --- presence, and one live stream per agent, hub-wide ------------------------------

    async def _read_presence(self) -> None:
        """Apply every agent row changed since the last read, a page at a time."""
        while True:
            rows = await self._store.presence_after(self.presence_rev, PRESENCE_PAGE)
            for rev, carrier, agent in rows:
                self._apply(rev, carrier, agent)
                self.presence_rev = max(self.presence_rev, rev)
            if len(rows) < PRESENCE_PAGE:
                return

    def _apply(self, rev: int, carrier: str, agent: pb.AgentInfo) -> None:
        presence = self._router.presence
        local = self._router.connection(agent.agent_id)
        if carrier == self._origin and agent.online:
            # This replica's own word: what the others said is stale. While its stream is
            # here (its AgentOnline may not have reached presence yet) that stands in until
            # the stream shows the agent (dropping it first would tell a leave and a join),
            # but no longer: else, should the stream's AgentOffline fail, it would keep the
            # agent online here after the stream ended.
            if local is None:
                presence.remote(agent.agent_id, None)
            else:
                presence.carried_here(agent.agent_id)
            return
        if not agent.online:
            presence.remote(agent.agent_id, None)
            return
        presence.remote(agent.agent_id, agent)
        # A local stream whose AgentOnline took an earlier revision than the agent's on
        # `carrier` is superseded (one whose AgentOnline is still committing will be the
        # later one). Revisions, not times: the hosts' clocks may differ.
        if local is not None and local.presence_rev is not None and rev > local.presence_rev:
            local.end(grpc.StatusCode.ABORTED, SUPERSEDED_ELSEWHERE)

    # --- notifications ----------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake the reader at each NOTIFY of another replica's (or this one's) commit."""
        import psycopg  # the postgres extra: only a replica needs it

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._store.listen_conninfo(),
                    autocommit=True,
                    connect_timeout=5,
                    # A connection that died silently is noticed, and opened again.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as connection:
                    await connection.execute(f"LISTEN {LOG_CHANNEL}")
                    await connection.execute(f"LISTEN {PRESENCE_CHANNEL}")
                    self._heard = self.published + 1  # read what committed while deaf
                    self._wake.set()
                    self._presence_wake.set()
                    async for notify in connection.notifies():
                        try:
                            seq, origin = parse_notify(notify.payload)
                        except ValueError:
                            continue  # not a replica's
                        if notify.channel == PRESENCE_CHANNEL:
                            # Its own too: an agent that moved here leaves `remote` by it.
                            if seq > self.presence_rev:
                                self._presence_wake.set()
                            continue
                        if origin == self._origin:
                            continue  # its outcome comes from the committer, no read needed
                        self.notifications += 1
                        self._heard = max(self._heard, seq)
                        self._wake.set()
            except (psycopg.Error, OSError) as exc:
                _TROUBLE.warning("replica: LISTEN connection lost (%s); reopening", exc)
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

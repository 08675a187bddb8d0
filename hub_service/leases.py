"""Replica leases: each replica's own, and the one leader lease, both rows in the shared
database, by the database's clock. They are renewed a third of `replica_lease` after the
last renewal was sent (a deadline, not a sleep between renewals), on a thread and a
database connection of their own (a connect storm's reads cannot queue a renewal), each
given up on within a third of a lease (PostgreSQL's statement_timeout, and the caller's
wait) and then tried again a tenth of a lease later.

A replica whose lease expired (killed, or paused or cut off from the database for longer)
is dead to the others: the leader marks the agents it carried offline (`ExpireReplicas`,
through the group commit like any disconnect, so their partners' sessions get the offline
grace) and drops its row. The leader alone runs the hub-wide jobs (deadline expiry, that
offline marking, event-log deletion); it is leader while `is_leader()`, which trusts a
renewal for a lease's time from when it was sent, by this process's monotonic clock, so a
replica that was paused stops leading before it renews, never after another took over.

A replica also trusts its own lease only for a lease's time from when its last renewal was
sent (`holds()`): once that passes (its renewals stuck, or the process paused), it stops
routing the shared log and ends every stream it carried at once (`on_expired`), without
waiting for the database: by then the leader may have dropped it from the replicas whose
readers bound pruning, and a stream it kept could be handed events after a hole.

A replica that finds its own lease expired when it renews comes back as a newcomer: it takes
its lease again, then ends every stream it carried (UNAVAILABLE: they reconnect and resume,
to it or another replica), since the others may have marked those agents offline already
and pruned events its readers would have needed. The lease is taken first, then the streams
are ended, so no stream it keeps was accepted under an expired lease.

Each renewal also publishes how far this replica's readers let the event log be pruned
(`prunable`: retention's low-water mark here, below which it already refuses resumes); the
leader deletes no further than the minimum over the live replicas (`sql_write.PruneEvents`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import StatusError
from .ratelimit import ThrottledLog

if TYPE_CHECKING:
    from .sql_store import SqlStore

log = logging.getLogger(__name__)
_TROUBLE = ThrottledLog(log, 10.0)
# After a renewal that failed, the next is tried this many times a lease later.
RETRIES = 10


class Leases:
    def __init__(
        self,
        store: SqlStore,
        replica_id: str,
        lease: float,
        *,
        prunable: Callable[[], int],
        on_lost: Callable[[int], Awaitable[None]],
        on_expired: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self.replica_id = replica_id
        self.lease = lease
        self._prunable = prunable  # how far this replica's readers let the log go
        self._on_lost = on_lost  # the lease came back expired: given where the log begins
        self._on_expired = on_expired  # its own lease ran out by this process's clock
        self._clock = time.monotonic
        self._leader_until = 0.0
        self._held_until = 0.0  # its own lease, trusted until then (monotonic)
        self._expiry: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the next renewal is to be sent (monotonic)
        self._stopping = False
        self._renewing = False
        self._task: asyncio.Task[None] | None = None
        self.lost = 0  # times this replica found its lease expired, for tests and logs

    def is_leader(self) -> bool:
        return self._clock() < self._leader_until

    def holds(self) -> bool:
        """Whether this replica's own lease is surely live: its last successful renewal was
        sent less than a lease ago (the database set its expiry after that)."""
        return self._clock() < self._held_until

    async def register(self) -> int:
        """Take this replica's lease; returns the oldest seq the log holds."""
        sent = self._clock()
        # Under the log's lock, behind a batch: a lease's time at most.
        oldest = await self._store.register_replica(self.replica_id, self.lease, self.lease)
        self._held(sent)
        return oldest

    def _held(self, sent: float) -> None:
        """A renewal sent at `sent` succeeded: held for a lease from then; `on_expired` is
        called if nothing renews it by then. The next renewal is due a third of it later."""
        self._held_until = sent + self.lease
        self._due = sent + self.lease / 3
        if self._expiry is not None:
            self._expiry.cancel()
        delay = max(0.0, self._held_until - self._clock())
        self._expiry = asyncio.get_running_loop().call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        self._expiry = None
        if self.holds():
            return
        self._leader_until = 0.0
        log.warning(
            "replica %s: its lease ran out (no renewal answered within %g s); ending its "
            "streams until it is renewed",
            self.replica_id,
            self.lease,
        )
        self._on_expired()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-leases")

    async def stop(self) -> None:
        """End both leases now (the leader then marks what this replica carried offline,
        and another replica leads at once): after the renewal in flight, if any, so that
        it cannot take the leader lease again behind the release."""
        self._stopping = True
        if self._task is not None:
            if not self._renewing:
                self._task.cancel()  # between renewals: nothing to wait for
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._leader_until = self._held_until = 0.0
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        try:
            await self._store.release_leases(self.replica_id, self.lease)
        except StatusError as error:  # the database is down: the leases expire by themselves
            log.warning("replica: cannot release its leases: %s", error.message)

    async def _run(self) -> None:
        """Renew at each deadline: a third of a lease after the last successful renewal was
        sent; after a failed one, again a little later, until the lease runs out."""
        while not self._stopping:
            await asyncio.sleep(max(0.0, self._due - self._clock()))
            self._renewing = True
            try:
                await self.renew()
            except StatusError as error:  # the database is down, or too slow to answer
                _TROUBLE.warning("replica: cannot renew its lease: %s", error.message)
                self._due = self._clock() + self.lease / RETRIES
            except Exception:
                log.exception("replica: renewing its lease failed")
                self._due = self._clock() + self.lease / RETRIES
            finally:
                self._renewing = False

    async def renew(self) -> None:
        sent = self._clock()
        held, leads = await self._store.renew_leases(
            self.replica_id, self.lease, self._prunable(), self.lease / 3
        )
        if not held:
            self._leader_until = 0.0
            self.lost += 1
            log.warning(
                "replica %s: its lease had expired (paused or cut off for over %g s); "
                "taking it again and ending its streams",
                self.replica_id,
                self.lease,
            )
            oldest = await self.register()
            await self._on_lost(oldest)
            return  # it leads again, if nobody does, at the next renewal
        self._held(sent)
        if leads:
            if not self.is_leader():
                log.info("replica %s leads (deadline expiry, retention, leases)", self.replica_id)
            self._leader_until = sent + self.lease
        else:
            self._leader_until = 0.0

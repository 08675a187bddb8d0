"""Replica leases: each replica's own, and the one leader lease, both rows in the shared
database renewed every third of `replica_lease`, by the database's clock.

A replica whose lease expired (killed, or paused or cut off from the database for longer)
is dead to the others: the leader marks the agents it carried offline (`ExpireReplicas`,
through the group commit like any disconnect, so their partners' sessions get the offline
grace) and drops its row. The leader alone runs the hub-wide jobs (deadline expiry, that
offline marking, event-log deletion); it is leader while `is_leader()`, which trusts a
renewal for a lease's time from when it was sent, by this process's monotonic clock, so a
replica that was paused stops leading before it renews, never after another took over.

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


class Leases:
    def __init__(
        self,
        store: SqlStore,
        replica_id: str,
        lease: float,
        *,
        prunable: Callable[[], int],
        on_lost: Callable[[int], Awaitable[None]],
    ) -> None:
        self._store = store
        self.replica_id = replica_id
        self.lease = lease
        self._prunable = prunable  # how far this replica's readers let the log go
        self._on_lost = on_lost  # the lease came back expired: given where the log begins
        self._clock = time.monotonic
        self._leader_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self.lost = 0  # times this replica found its lease expired, for tests and logs

    def is_leader(self) -> bool:
        return self._clock() < self._leader_until

    async def register(self) -> int:
        """Take this replica's lease; returns the oldest seq the log holds."""
        return await self._store.register_replica(self.replica_id, self.lease)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="replica-leases")

    async def stop(self) -> None:
        """End both leases now (the leader then marks what this replica carried offline,
        and another replica leads at once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._leader_until = 0.0
        try:
            await self._store.release_leases(self.replica_id)
        except StatusError as error:  # the database is down: the leases expire by themselves
            log.warning("replica: cannot release its leases: %s", error.message)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew()
            except StatusError as error:  # the database is down: the next round retries
                _TROUBLE.warning("replica: cannot renew its lease: %s", error.message)
            except Exception:
                log.exception("replica: renewing its lease failed")

    async def renew(self) -> None:
        sent = self._clock()
        if not await self._store.renew_lease(self.replica_id, self.lease, self._prunable()):
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
            sent = self._clock()
        if await self._store.take_leadership(self.replica_id, self.lease):
            if not self.is_leader():
                log.info("replica %s leads (deadline expiry, retention, leases)", self.replica_id)
            self._leader_until = sent + self.lease
        else:
            self._leader_until = 0.0

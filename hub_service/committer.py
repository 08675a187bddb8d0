"""Group commit: writes from every stream are queued, applied in batches of one
transaction each, and answered only after their commit."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import grpc

from .errors import StatusError, unavailable
from .lingers import Linger
from .metrics import HubMetrics
from .outcomes import Outcome
from .state import Command, HubStore

log = logging.getLogger(__name__)

Reply = Callable[[Outcome | StatusError], None]
# Publishes a committed outcome, then calls the answer (at once, or in a replica once the
# shared log's reader has published every event before it: `replica.LogFollower`).
Publish = Callable[[Outcome, Callable[[], None]], None]


@dataclass(slots=True)
class _Pending:
    """A queued command and whom to answer: exactly once, whatever path answers it."""

    command: Command
    reply: Reply
    size: int = 0  # bytes of the message it came in, towards the batch's byte bound
    answered: bool = False

    def answer(self, result: Outcome | StatusError) -> None:
        if self.answered:
            return
        self.answered = True
        try:
            self.reply(result)
        except Exception:
            log.exception("answering a %s failed", type(self.command).__name__)


@dataclass(slots=True)
class _Batch:
    """A batch sent to the store: its commands, the commit under way, and when (loop time)."""

    pendings: list[_Pending]
    sent: float
    answered: float = 0.0  # when the store returned (loop time)
    task: asyncio.Task[list[Outcome | StatusError]] = field(init=False)


class GroupCommitter:
    """Queues commands (bounded), commits them in batches, publishes in `seq` order.

    Up to `depth` batches are with the store at once: while one commits, the next is
    sent (once as much waits as went in the last), so the writer never waits for this loop
    to publish one batch and gather the next (what that buys: docs/benchmarks.md).

    `on_commit` runs on the event loop for each committed outcome, in commit
    order: events reach the router in the order of their `seq`. Each command's
    reply runs once its own outcome is published (`Publish`'s answer), so a
    trainer's receipt is queued no later than the events its message caused.
    """

    def __init__(
        self,
        store: HubStore,
        on_commit: Publish,
        *,
        linger: Linger,
        on_failure: Callable[[], None] = lambda: None,
        on_health: Callable[[bool], None] = lambda ok: None,
        batch_size: int = 512,
        queue_size: int = 8192,
        batch_bytes: int = 4 * 1024 * 1024,
        depth: int = 2,
        metrics: HubMetrics | None = None,
    ) -> None:
        self._store = store
        metrics = metrics or HubMetrics()
        self._commit_seconds = metrics.commit_seconds
        self._batch_sizes = metrics.batch_size
        self._on_commit = on_commit
        self._on_failure = on_failure
        # Told after every batch whether the database and the writer answered (no
        # UNAVAILABLE), so health can follow them.
        self._on_health = on_health
        self._inflight: list[_Pending] = []  # a batch being gathered
        # Batches sent to the store, oldest first, at most `depth`: the store applies them in
        # the order sent, and they are published in that order.
        self._committing: collections.deque[_Batch] = collections.deque()
        self._depth = depth
        self._wake = asyncio.Event()  # the oldest batch answered, or `_wake_at` commands wait
        self._wake_at: int | None = None
        self._last_answered = 0.0
        self._batch_size = batch_size
        # A batch also ends at this many bytes of messages (the first always goes): its
        # transaction, and its trip to and from the writer process, stay short.
        self._batch_bytes = batch_bytes
        self._carried: _Pending | None = None  # the command that ended the last batch
        self._linger = linger  # its length may follow the load (lingers.py)
        self.commits = 0  # batches committed (or attempted), for stats and tests
        self.last_commit_seconds = 0.0  # the latest batch's transaction (GetHubStats)
        # Seconds spent committing since the start: the commit linger's load (lingers.py).
        self.busy_seconds = 0.0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def queued(self) -> int:
        """Commands waiting for a group commit (the metrics' queue depth)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def enqueue(self, command: Command, reply: Reply, size: int = 0) -> None:
        """Wait for room in the queue; `reply` gets the outcome or error once committed.
        `size`: the bytes of the message the command came in."""
        if self._closed:
            raise unavailable("the hub is shutting down; reconnect and resend")
        pending = _Pending(command, reply, size)
        await self._queue.put(pending)
        if self._wake_at is not None and self._waiting() >= self._wake_at:
            self._wake.set()
        if self._closed and (self._task is None or self._task.done()):
            pending.answer(unavailable("the hub shut down before committing this"))

    async def submit(self, command: Command) -> Outcome:
        """Commit one command and wait for its outcome (a StatusError is raised)."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def reply(result: Outcome | StatusError) -> None:
            if future.done():
                return
            if isinstance(result, StatusError):
                future.set_exception(result)
            else:
                future.set_result(result)

        await self.enqueue(command, reply)
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_commit = -1.0
        committing = self._committing
        while True:
            if committing:
                oldest = committing[0]
                if oldest.task.done():
                    committing.popleft()
                    self._finish(oldest)
                    last_commit = loop.time()
                    continue
                enough = self._enough(committing)
                if enough is None or self._waiting() < enough:
                    self._wake.clear()
                    self._wake_at = enough
                    await self._wake.wait()  # a batch answered, or enough waits to send
                    self._wake_at = None
                    continue
            carried, self._carried = self._carried, None
            first = carried or await self._queue.get()
            batch = [first]
            self._inflight = batch  # stop() answers it if cancelled from here on
            # Busy (the last commit ended less than `linger` ago): let more commands join this
            # one, since a commit's fixed cost dwarfs a command's. Idle, or a full batch
            # already waiting: commit at once. (With a batch in flight, this one already
            # waited for enough to join it.)
            wait = last_commit + self._linger.seconds - loop.time()
            if (
                wait > 0
                and not committing
                and carried is None
                and self._queue.qsize() + 1 < self._batch_size
            ):
                await asyncio.sleep(wait)
            size = first.size
            while len(batch) < self._batch_size and not self._queue.empty():
                pending = self._queue.get_nowait()
                size += pending.size
                if size > self._batch_bytes:
                    self._carried = pending  # first in the next batch
                    break
                batch.append(pending)
            sent = _Batch(batch, loop.time())
            sent.task = asyncio.create_task(self._commit(sent))
            sent.task.add_done_callback(lambda _: self._wake.set())
            committing.append(sent)
            self._inflight = []

    def _enough(self, committing: collections.deque[_Batch]) -> int | None:
        """With a batch in flight, the commands that must wait for the next to be sent now
        (the writer goes on to it the moment it has answered, rather than wait for this
        loop's turn): as many as went in the last one, so batches do not shrink for it.
        None: the pipe is full."""
        if len(committing) >= self._depth:
            return None
        last, room = len(committing[-1].pendings), self._queue.maxsize
        return min(last, room) if room > 0 else last  # never more than the queue holds

    def _waiting(self) -> int:
        return self._queue.qsize() + (self._carried is not None)

    async def _commit(self, batch: _Batch) -> list[Outcome | StatusError]:
        try:
            results = await self._store.commit([p.command for p in batch.pendings])
        except Exception as exc:  # the store could not even run the batch
            log.exception("group commit failed")
            results = [unavailable(f"commit failed: {exc}")] * len(batch.pendings)
        batch.answered = asyncio.get_running_loop().time()
        return results

    def _finish(self, batch: _Batch) -> None:
        """Publish a committed batch's outcomes in order and answer its commands."""
        results = batch.task.result()
        # The writer's own time: from the send, or from the answer before (it was busy).
        self.last_commit_seconds = batch.answered - max(batch.sent, self._last_answered)
        self._last_answered = batch.answered
        self.busy_seconds += self.last_commit_seconds
        self._commit_seconds.observe(self.last_commit_seconds)
        self._batch_sizes.observe(len(batch.pendings))
        down = any(
            isinstance(r, StatusError) and r.code == grpc.StatusCode.UNAVAILABLE for r in results
        )
        if down:
            # A failed COMMIT may still have been applied: never trust the live feed
            # to have carried every event after one.
            self._on_failure()
        self._on_health(not down)
        for pending, result in zip(batch.pendings, results, strict=True):
            if isinstance(result, Outcome):
                try:
                    self._on_commit(result, partial(pending.answer, result))
                except Exception:
                    log.exception("routing a committed event failed")
                    pending.answer(result)
            else:
                pending.answer(result)
        self.commits += 1
        for _ in batch.pendings:
            self._queue.task_done()

    async def stop(self, timeout: float) -> None:
        """Refuse new commands, commit what is queued (within `timeout`), then stop."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Only if the timeout struck: the batches being committed and what is still queued.
        leftovers: list[_Pending] = []
        while self._committing:
            batch = self._committing.popleft()
            if batch.task.done() and not batch.task.cancelled() and not leftovers:
                self._finish(batch)  # committed, and all before it published: answer it
            else:
                # Unknown, or behind an unknown one (published out of order, its events
                # would skip seqs): the resend is deduplicated against the ledger.
                batch.task.cancel()
                leftovers.extend(batch.pendings)
        leftovers.extend(self._inflight)
        if self._carried is not None:
            leftovers.append(self._carried)
        self._inflight, self._carried = [], None
        while not self._queue.empty():
            leftovers.append(self._queue.get_nowait())
        for pending in leftovers:
            pending.answer(unavailable("the hub shut down before committing this"))
            self._queue.task_done()  # a second stop() has nothing to wait for

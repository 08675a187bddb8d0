"""The writer process plumbing: group commits run in a child process, not in a thread of
the hub. The child runs the SQL write side (`sql_write.SqlWriter`); this module only
starts it, talks to it over a pipe, and replaces it.

A writer thread shares the GIL with the event loop. Measured at 220 shares/s to 50
trainers, a commit of one or two shares waited ~4 ms for the GIL (against ~1 ms of
work), and SQLAlchemy's share of the hub's single core of Python was about a quarter
during ingest. A child process has an interpreter of its own: the loop keeps its core
and the commit runs beside it.

One pipe: the commands go over pickled, the outcomes (or errors) come back pickled, in the
order sent. The child commits one batch at a time, but the next may already wait in its
pipe, so it starts on it the moment it has answered (the group committer keeps up to
`commit_pipeline_depth` in flight). Retention's deletes (`sql_write.WriterJob`) take the
same pipe between commits, so they never hold the database's write lock beside a commit.
Every answer has a deadline. A child that dies or stops answering is killed and every
commit it owed is answered UNAVAILABLE (its outcome is unknown, so the committer distrusts
the live feed; a resend is deduplicated by its message_id); the next
commit starts a new child, which reads the event log's head again (a start that failed
is not retried for a second). The child ignores SIGINT and SIGTERM (the hub drains first,
then closes the pipe) and exits when the pipe closes, so it never outlives the hub, even
one killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import pickle
import signal
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.util import Finalize
from typing import Any

from . import heap
from .collaboration import Policy
from .errors import StatusError, unavailable
from .outcomes import Outcome
from .sql_write import SharedLog, SqlWriter, WriterJob, make_engine
from .state import Command

log = logging.getLogger(__name__)

# Forked from a server process that has imported this module once: a new writer starts
# in milliseconds, and no fork ever copies the hub's threads (gRPC's, the loop's). Where
# there is no fork server (Windows), a fresh interpreter is spawned instead.
_FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()
_CONTEXT: ForkServerContext | SpawnContext = (
    multiprocessing.get_context("forkserver")
    if _FORKSERVER
    else multiprocessing.get_context("spawn")
)
_HEADER = struct.Struct("!I")  # frame length; a batch is bounded by commit_batch_bytes
START_TIMEOUT = 60.0  # the child opens the database and reads the log's head
_BUFFER = 16 * 1024 * 1024  # read ahead this much of a large frame before pausing
CLOSE_TIMEOUT = 10.0  # the child finishes the commit it is in, then exits


@dataclass(frozen=True)
class WriterSettings:
    """What the child needs to open the same database the hub reads."""

    database_url: str
    policy: Policy
    busy_timeout: float
    log_level: int = logging.INFO
    shared: SharedLog | None = None  # a replica: `SqlWriter`'s shared mode


class WriterProcess:
    """The parent's end: start, commit, close. Commits may overlap: each is sent as soon as
    the one before it has been (one at a time, under a lock), and their answers come back in
    the order sent, so the child can start the next batch the moment it has answered one."""

    def __init__(
        self, settings: WriterSettings, commit_timeout: float, retry_interval: float = 1.0
    ) -> None:
        if commit_timeout <= 0:
            raise ValueError(f"commit_timeout must be positive, not {commit_timeout!r}")
        self._settings = settings
        self._commit_timeout = commit_timeout
        # After a failed start, none for this long: a child that cannot open the database
        # must not be forked again for every commit.
        self._retry_interval = retry_interval
        self._retry_at = 0.0
        self._sending = asyncio.Lock()  # one frame at a time into the pipe
        self._closed = False
        self._process: Any = None  # multiprocessing's Process (typed loosely by its stubs)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._owed: _Owed | None = None  # what the live child still has to answer
        # Closes our end of the pipe when the interpreter exits, before multiprocessing
        # joins its children: however the hub ends, the child then sees end of input.
        self._at_exit: Finalize | None = None
        self.starts = 0  # children started, for stats and tests

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    @property
    def owed(self) -> int:
        """Answers the live child still owes: commits and jobs sent, not yet answered."""
        return 0 if self._owed is None else len(self._owed.futures)

    async def start(self) -> None:
        async with self._sending:
            await self._start()

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        results: list[Outcome | StatusError] = await self._exchange(list(commands))
        return results

    async def run(self, job: WriterJob) -> int:
        """A retention job (`SqlWriter.run`) in the child, between commits: rows deleted."""
        result: int | StatusError = await self._exchange(job)
        if isinstance(result, StatusError):
            raise result
        return result

    async def _exchange(self, payload: list[Command] | WriterJob) -> Any:
        # Pickled before the lock: a payload that does not pickle fails alone, and costs
        # neither the child nor the commits it owes.
        data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _HEADER.pack(len(data)) + data
        async with self._sending:
            if self._closed:
                raise unavailable("the hub's store is closed")
            try:
                async with asyncio.timeout(self._commit_timeout):
                    owed = await self._deliver(frame)
            except TimeoutError:
                self._discard()
                raise unavailable(
                    f"the writer process did not take a commit within {self._commit_timeout:g} s "
                    "and was restarted; retry with the same message_id"
                ) from None
            except BaseException:
                self._discard()  # the frame may be half-written: the pipe is out of step
                raise
            answer = owed.expect()
            if owed.task is None or owed.task.done():
                owed.task = asyncio.create_task(self._collect(owed), name="writer-answers")
        # A caller that stops waiting cancels only its own future: the collector still reads
        # the answer, so the pipe stays in step.
        return await answer

    async def _collect(self, owed: _Owed) -> None:
        """Read one child's answers in the order its frames were sent, each within the
        commit timeout from the moment it is the oldest owed. A child that misses one, or
        whose pipe ends, is killed, and every answer it owed is UNAVAILABLE (unknown)."""
        while owed.futures:
            try:
                async with asyncio.timeout(self._commit_timeout):
                    answer = await _receive(owed.reader)
            except TimeoutError:
                error = unavailable(
                    f"the writer process did not answer within {self._commit_timeout:g} s "
                    "and was restarted; retry with the same message_id"
                )
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                error = unavailable(
                    f"the writer process ended mid-commit ({type(exc).__name__}); "
                    "retry with the same message_id"
                )
            except Exception as exc:  # an answer that does not unpickle: out of step
                log.exception("the writer process's answer could not be read")
                error = unavailable(f"the writer process's answer was lost ({exc}); retry")
            else:
                future = owed.futures.popleft()
                if not future.done():  # its caller may have stopped waiting
                    future.set_result(answer)
                continue
            # Still the live child's: a replaced child's collector is cancelled first.
            self._discard(error)
            return

    async def _deliver(self, frame: bytes) -> _Owed:
        """Send the frame to a live child; the account its answer will be owed on. A child
        found dead, or one whose end refuses the write, cannot have applied this batch (a
        batch is applied only once all of it is read): it is replaced and the batch sent
        once more. Life is judged by the pipe, not by multiprocessing, which reports a live
        child dead once its fork server is gone (a SIGTERM to the whole process group)."""
        for attempt in range(2):
            if self._reader is None or self._reader.at_eof():
                self._discard()
                await self._start()
            owed = self._owed
            assert self._writer is not None and owed is not None  # a live child
            try:
                # One write, so one send(): two cost a system call more, and could wake
                # the child for the header alone.
                self._writer.write(frame)
                await self._writer.drain()
            except ConnectionError:
                self._discard()
                if attempt:
                    raise
                continue
            if owed is not self._owed:
                # Replaced while the frame waited for room in the pipe (the child ahead of
                # it wedged): the new child never saw it, and the old one is gone.
                raise unavailable(
                    "the writer process was replaced while this commit was sent; "
                    "retry with the same message_id"
                )
            return owed
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def close(self) -> None:
        async with self._sending:
            self._closed = True
            if self._owed is not None and self._owed.task is not None:
                await asyncio.wait([self._owed.task])  # the answers owed: each has its deadline
            process = self._process
            self._drop_pipe()  # end of input: the child finishes its commit and exits
            self._process = None
            if process is not None:
                await asyncio.to_thread(process.join, CLOSE_TIMEOUT)
                if process.is_alive():
                    log.warning("the writer process did not exit; killing it")
                    process.kill()
                    await asyncio.to_thread(process.join, CLOSE_TIMEOUT)

    # --- the parent's side of the pipe ---------------------------------------

    async def _start(self) -> None:
        if time.monotonic() < self._retry_at:
            raise unavailable("the writer process could not start; retrying shortly")
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._spawn()
        except BaseException:
            self._discard()
            self._retry_at = time.monotonic() + self._retry_interval
            raise

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        self._at_exit = Finalize(None, ours.close, exitpriority=100)
        process = _CONTEXT.Process(
            target=_serve, args=(theirs, self._settings), name="kernelhub-writer", daemon=True
        )

        def launch() -> None:
            try:
                process.start()  # the first start launches the fork server (an import)
            finally:
                theirs.close()  # only once the fork server has its copy

        await asyncio.to_thread(launch)
        self.starts += 1
        self._process = process
        self._reader, self._writer = await asyncio.open_connection(sock=ours, limit=_BUFFER)
        self._owed = _Owed(self._reader)
        ready = await _receive(self._reader)
        if isinstance(ready, StatusError):
            raise ready
        log.info("writer process %d ready (event log head: seq %d)", process.pid, ready)

    def _drop_pipe(self) -> None:
        if self._writer is not None:
            # Aborted, not closed: a close waits to flush what is buffered, and keeps the
            # socket in the selector after `_at_exit` has closed it, so the next socket to
            # get its number could not be watched.
            self._writer.transport.abort()
        if self._at_exit is not None:
            self._at_exit()  # closes our end (if the transport has not) and unregisters
        self._reader = self._writer = self._at_exit = None

    def _discard(self, error: StatusError | None = None) -> None:
        """Drop the pipe and kill the child (the fork server reaps it); what it still owed
        is `error`: unknown, since a batch it had read may have committed."""
        owed, self._owed = self._owed, None
        self._drop_pipe()
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self._process = None
        if owed is not None:
            owed.fail(
                error
                or unavailable(
                    "the writer process was replaced mid-commit; retry with the same message_id"
                )
            )
            if owed.task is not None and owed.task is not asyncio.current_task():
                owed.task.cancel()


class _Owed:
    """The answers one child still owes, oldest first, and the task that reads them: each
    child has its own, so a replaced child's debts are never paid by the next one."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.futures: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.task: asyncio.Task[None] | None = None  # the collector (`WriterProcess._collect`)

    def expect(self) -> asyncio.Future[Any]:
        """One more answer, due after those already owed."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    def fail(self, error: StatusError) -> None:
        while self.futures:
            future = self.futures.popleft()
            if not future.done():
                future.set_exception(error)


async def _receive(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


# --- the child --------------------------------------------------------------


def _serve(sock: socket.socket, settings: WriterSettings) -> None:
    """Commit each batch that arrives, answer with its outcomes; exit at end of input."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s - kernelhub-writer - %(levelname)s - %(message)s",
    )
    writer = SqlWriter(
        make_engine(settings.database_url, int(settings.busy_timeout * 1000)),
        settings.policy,
        settings.shared,
    )
    with sock, sock.makefile("rb") as incoming:
        try:
            ready: int | StatusError = writer.load_head()
        except Exception as exc:
            ready = unavailable(f"the writer process cannot open the database: {exc}")
        _reply(sock, ready)
        if isinstance(ready, StatusError):
            return
        heap.settle()
        while len(header := incoming.read(_HEADER.size)) == _HEADER.size:
            (size,) = _HEADER.unpack(header)
            payload: list[Command] | WriterJob = pickle.loads(incoming.read(size))
            _reply(
                sock, writer.commit(payload) if isinstance(payload, list) else _run(writer, payload)
            )
    with contextlib.suppress(Exception):
        writer.dispose()


def _run(writer: SqlWriter, job: WriterJob) -> int | StatusError:
    try:
        return writer.run(job)
    except Exception as exc:  # the database is down or locked: the hub retries next round
        return unavailable(f"retention job failed: {exc}")


def _reply(sock: socket.socket, payload: object) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


if _FORKSERVER:
    _CONTEXT.set_forkserver_preload([__name__])

"""One live trainer stream on the way out: what waits to be sent, and the sender.

Everything waiting is bounded. Receipts and errors are bounded by the stream's
in-flight window (a message's slot is freed only once its answer is written).
Live events wait in a fixed-size queue; when it is full the connection stops
taking live events and reads them back from the event log instead, in order,
then rejoins the live feed. New connections start that way too, which is how
replay after `resume_after_seq` works: one mechanism for both. The log is read with the
stream's subscription, as the router filters live events with it.

Presence (who is online) is not in the log: the roster, then changes keyed by agent, so a
burst of joins costs a stream a few writes (at most one per presence linger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from generated.kernelhub.v1 import hub_pb2 as pb

from . import paging, wire
from .complementarity import Candidate
from .errors import StatusError
from .lingers import Linger
from .metrics import HubMetrics
from .outcomes import Outcome
from .presence import Entry, Presence
from .ratelimit import ThrottledLog
from .state import REPLAY_SCAN_SEQS, EventPage, HubStore
from .subscriptions import Filter

# (after_seq, limit, max_bytes, subscription) -> the next page of the log this stream reads back.
ReadLog = Callable[[int, int, int, Filter], Awaitable[EventPage]]

log = logging.getLogger(__name__)
# One line per interval however many connections send an oversized event.
_OMITTED = ThrottledLog(log, 10.0)

LOG_RETRY_SECONDS = 0.5
# How long a stream's end waits for its sender's write in progress before cancelling it.
STOP_SENDER_SECONDS = 1.0
CATCH_UP_POLL_SECONDS = 0.05
# Agents at most in one response's presence update (each is small: ~150 bytes).
PRESENCE_PER_RESPONSE = 1024


# A stream's write: a response, or one already serialized (`wire`).
Write = Callable[[pb.ConnectResponse | bytes], Awaitable[None]]


class Wake:
    """The sender's wake-up: set by whoever queues output, awaited by the sender, with an
    optional timeout. A future of the loop's own and a timer handle, not `asyncio.Event` and
    `asyncio.timeout`: each of their calls looks the running loop up, and CPython 3.11 makes
    a getpid system call per lookup (docs/benchmarks.md measured its share). One waiter at a time (the stream's sender); not thread-safe, like
    the loop it runs on."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        """Until set (at once if it is), or `timeout` seconds (None: no limit)."""
        if self._set:
            return
        assert self._waiter is None, "one waiter at a time"
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _release, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class PresencePart(NamedTuple):
    """What of presence one response carries: its entries' wire bytes, their size, and
    whether they are (the end of) the roster."""

    entries: list[bytes]
    used: int
    roster: bool = False
    roster_complete: bool = False


class Connection:
    def __init__(
        self,
        hello: pb.Hello,
        *,
        token_hash: str,
        store: HubStore,
        max_inflight: int,
        queue_size: int,
        events_per_response: int,
        replay_page_size: int,
        max_bytes: int,
        metrics: HubMetrics,
        linger: Linger,
        replay_scan_seqs: int = REPLAY_SCAN_SEQS,
        read_log: ReadLog | None = None,
        head: Callable[[], int] = lambda: 0,
        wires: wire.EventWires | None = None,
    ) -> None:
        """`max_bytes`: what one response may carry (`paging.budget` of the message limit);
        `read_log`: where it catches up from (default: the events the agent is entitled to;
        a Watch stream reads every event); `head`: the newest seq published to the streams
        (a log read that reached the end leaves the cursor there, matches or not)."""
        self._head = head
        self._wires = wires or wire.EventWires()  # shared by the hub's streams (the router's)
        self.agent_id = hello.agent_id
        self.subscription = Filter.of(hello.subscription)
        # Bumped by a Subscribe: a log read begun before it is not used.
        self._epoch = 0
        # Presence (None: not following it): the roster still to send (None: sent), then
        # the presence log from `_presence_cursor`, once it says changes wait.
        self._presence: Presence | None = None
        self._roster: list[Entry] | None = None
        self._roster_sent = 0
        self.roster_size = 0
        self._presence_cursor = 0
        self._presence_ready = False
        self.token_hash = token_hash  # re-checked while the stream lives (revocation)
        self.hello = hello
        self._window = asyncio.Semaphore(max_inflight)
        self._unanswered = 0
        self._all_answered = asyncio.Event()
        self._all_answered.set()
        self._read_log: ReadLog = read_log or (
            lambda after, limit, max_bytes, subscription: store.events_for(
                hello.agent_id, after, limit, max_bytes, subscription, replay_scan_seqs
            )
        )
        self._queue_size = queue_size
        self._per_response = events_per_response
        self._replay_page = replay_page_size
        self._linger = linger  # shared by the hub's streams (lingers.py)
        self._max_bytes = max_bytes
        self._sent_receipts = metrics.receipts
        self._sent_events = metrics.events
        self._fallbacks = metrics.fallbacks
        # The highest seq queued or sent: nothing at or below it is sent again.
        self.cursor = hello.resume_after_seq
        self.catching_up = True
        # The end of the first catch-up (the replay): the seq it reached, until the marker
        # saying so is sent; then nothing, as it is sent once.
        self._replay_floor = 0  # Welcome.head_seq: the replay covers at least that
        self._replay_end: int | None = None
        self._replayed = False
        # When the hub stored this agent's connect (AgentInfo.last_seen_time), once known.
        self.connected_time: Timestamp | None = None
        # Its entry in the others' training syncs and its size, and as a partner candidate,
        # built once (training_sync).
        self.listing: tuple[pb.AgentInfo, int] | None = None
        self.candidate = Candidate(self.agent_id, hello.specialization)
        self.presence_rev: int | None = None  # the revision its AgentOnline gave its row
        self._joining: list[pb.HubEvent] | None = None  # published during a log read
        self._must_read = False  # a commit's outcome is in doubt: read the log to its end
        self._retry_at = 0.0  # when the event log may be read again after a failure
        self.fell_behind = 0  # times the live queue overflowed
        self._events: deque[pb.HubEvent] = deque()
        self._receipts: list[pb.Receipt] = []
        self._errors: list[pb.RequestError] = []
        self._sync: pb.TrainingSync | None = None
        self._welcome: pb.Welcome | None = None  # until the first response carries it
        self._wake = Wake()
        self.end_status: tuple[grpc.StatusCode, str] | None = None
        self.ended = asyncio.Event()
        self._stopping = False

    @property
    def reads_log_after(self) -> int | None:
        """The seq after which this connection still reads the event log (retention keeps
        the rest), or None while it is live: then every event it is entitled to up to the
        router's last published one is already queued, and it needs the log only again
        after falling behind, which it does in the router's turn, from a later event."""
        return self.cursor if self.catching_up else None

    # --- called by the router and the reader ---------------------------------

    def offer(self, event: pb.HubEvent) -> None:
        if event.seq <= self.cursor:
            return
        if self.catching_up:
            # Reading the log: keep what is published meanwhile (bounded), so the read can
            # hand over to the live feed without a gap however busy the hub is.
            if self._joining is not None:
                if len(self._joining) < self._queue_size:
                    self._joining.append(event)
                else:
                    self._joining = None  # too much: read the log once more
            return
        if len(self._events) >= self._queue_size:
            self.catching_up = True  # the log has it; read it back when the queue drains
            # Level with the feed up to here: the read (and retention's pin) starts after it.
            self.cursor = max(self.cursor, event.seq - 1)
            self.fell_behind += 1
            self._fallbacks.inc()
            return
        self._events.append(event)
        self.cursor = event.seq
        if len(self._events) in (1, self._per_response):
            # The sender knows of the rest: it looks at the queue when its linger ends.
            self._wake.set()

    def start_at(self, skip_history: bool, head: int, oldest: int) -> int:
        """Where the stream starts, set before it is attached: after `head` (from now), after
        its resume seq, or (0) from `oldest`, what the log still holds (a cursor below the
        low-water mark would look like a reader pinning pruning far behind). Returns it."""
        if skip_history:
            self.cursor = max(self.cursor, head)
        elif self.cursor == 0:
            self.cursor = oldest - 1
        return self.cursor

    def start_roster(self, presence: Presence) -> None:
        """Send the roster (everyone online but this agent), then the changes after it."""
        self._presence = presence
        self._roster = presence.roster()
        if (mine := presence.entry(self.agent_id)) is not None:  # a reconnect: not itself
            self._roster.remove(mine)
        self._roster_sent = 0
        self.roster_size = len(self._roster)
        self._presence_cursor = presence.version
        self._wake.set()

    def presence_ready(self) -> None:
        """Changes wait in the presence log (called at most once per presence linger)."""
        if self._presence is not None and self._presence_cursor < self._presence.version:
            self._presence_ready = True
            self._wake.set()

    def resubscribe(self, subscription: Filter, last_published_seq: int) -> int:
        """Switch to `subscription`; returns the seq S it takes effect after. Live, every
        event up to the last published one was offered under the old one: S is that seq.
        Catching up, S is the cursor (what was queued under the old one): the log is read
        from there with the new one, and a read under way is not used."""
        if self.catching_up:
            at = self.cursor
            self._epoch += 1
            self._joining = None
        else:
            at = self.cursor = max(self.cursor, last_published_seq)
        self.subscription = subscription
        if not subscription.presence:
            self._presence = self._roster = None
            self.roster_size = 0
            self._presence_ready = False
        return at

    def answer(self, message_id: str, result: Outcome | BaseException) -> None:
        """Queue the receipt or error for one message (its window slot is freed once sent)."""
        if isinstance(result, Outcome):
            self._receipts.append(
                pb.Receipt(
                    message_id=message_id,
                    seq=result.seq,
                    resource_id=result.resource_id,
                    duplicate=result.duplicate,
                )
            )
        else:
            error = (
                result
                if isinstance(result, StatusError)
                else StatusError(
                    grpc.StatusCode.INTERNAL, f"the hub failed to handle this message: {result}"
                )
            )
            self._errors.append(error.to_request_error(message_id))
        self._wake.set()

    def send_sync(self, sync: pb.TrainingSync) -> None:
        self._sync = sync  # only the latest matters
        self._wake.set()

    def stop_sending(self) -> None:
        """The sender finishes the write it is in, then returns."""
        self._stopping = True
        self._wake.set()

    def end(self, code: grpc.StatusCode, message: str) -> None:
        if self.end_status is None:
            self.end_status = (code, message)
        self.ended.set()
        self._wake.set()

    async def admit(self) -> None:
        """Take a window slot for one incoming message; waits while the window is full."""
        await self._window.acquire()
        self._unanswered += 1
        self._all_answered.clear()

    async def wait_all_answered(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._all_answered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- the sender -----------------------------------------------------------

    async def run_sender(self, welcome: pb.Welcome, write: Write) -> None:
        """Write what waits, coalesced. Events to a stream written to less than `linger` ago
        wait out the rest of it (unless a full response is ready): at most one write of
        events per `linger`, since a write costs the same CPU for one event as for 64. An
        idle stream's first event goes out at once, and receipts and errors never wait:
        they are a trainer's round trip. The welcome goes out at once, in one write with
        whatever is ready beside it (the first training sync, the roster's first part, the
        replay's first page or its end)."""
        loop = asyncio.get_running_loop()
        self._replay_floor = welcome.head_seq
        self._welcome = welcome
        last_write = -math.inf
        while not (self.ended.is_set() or self._stopping):
            read_on = False
            if self.catching_up and not self._events and time.monotonic() >= self._retry_at:
                try:
                    read_on = await self._read_back()
                except StatusError as error:
                    if error.code == grpc.StatusCode.OUT_OF_RANGE:
                        self.end(error.code, error.message)  # what it was owed is gone
                        break
                    # The log is unreadable for now (database down): keep the stream, keep
                    # answering, and try again shortly.
                    log.debug("%s: cannot read the event log: %s", self.agent_id, error.message)
                    self._retry_at = time.monotonic() + LOG_RETRY_SECONDS
            if not self._has_output():
                if self.ended.is_set() or self._stopping:
                    break  # asked during the log read: its wake-up is not to be cleared
                if read_on:
                    continue  # the read stopped at its scan bound: no wait to read on
                # Offers are not signalled while catching up: look at the log again soon.
                await self._sleep(loop, CATCH_UP_POLL_SECONDS if self.catching_up else None)
                continue
            wait = last_write + self._linger.seconds - loop.time()
            if (
                wait > 0
                and len(self._events) < self._per_response
                and not (self._receipts or self._errors)
            ):
                # Linger, unless a receipt, an error or a full response turns up meanwhile.
                await self._sleep(loop, wait)
                continue
            await self._flush(write)
            last_write = loop.time()
        if self._stopping and not self.ended.is_set() and self._has_output():
            # A graceful end: what the linger held goes out before the status.
            await self._flush(write)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        """Until woken (or `timeout` seconds, if given)."""
        self._wake.clear()
        await self._wake.wait(loop, timeout)

    def _presence_due(self) -> bool:
        return self._roster is not None or self._presence_ready

    def _has_output(self) -> bool:
        return bool(
            self._welcome is not None
            or self._events
            or self._receipts
            or self._errors
            or self._sync
            or self._replay_end is not None
            or self._presence_due()
        )

    def _take_presence(self, room: int) -> PresencePart | None:
        """The roster's next part, or (once it is sent) the changes since the last update,
        each agent once in its latest state, in at most `room` bytes (at least one entry)."""
        if self._presence is None:
            return None
        if self._roster is not None:
            roster = self._roster
            start = self._roster_sent
            wires = [e.wire for e in roster[start : start + PRESENCE_PER_RESPONSE]]
            used = sum(map(len, wires))
            while used > room and len(wires) > 1:  # rare: a page is ~150 KB at most
                used -= len(wires.pop())
            self._roster_sent = end = start + len(wires)
            complete = end == len(roster)
            if complete:
                self._roster = None
            return PresencePart(wires, used, True, complete)
        self._presence_ready = False
        changes = self._presence.since(self._presence_cursor, PRESENCE_PER_RESPONSE + 1)
        if changes is None:  # too far behind the log: the roster again
            self.start_roster(self._presence)
            return self._take_presence(room)
        # Each agent once, in its latest state (a dict keeps the first key's place and the
        # last value), its own changes left out; at most a page, within `room` bytes.
        page = changes[:PRESENCE_PER_RESPONSE]  # one more tells whether more wait
        latest = {e.agent_id: e.wire for e in page}
        latest.pop(self.agent_id, None)
        wires = list(latest.values())
        used = sum(map(len, wires))
        if used > room and len(wires) > 1:  # rare: take fewer changes
            page, used, latest = [], 0, {}
            for entry in changes[:PRESENCE_PER_RESPONSE]:
                if entry.agent_id not in latest and used + entry.cost > room and latest:
                    break
                page.append(entry)
                if entry.agent_id != self.agent_id:
                    used += entry.cost - len(latest.get(entry.agent_id, b""))
                    latest[entry.agent_id] = entry.wire
            wires = list(latest.values())
        self._presence_cursor += len(page)
        if len(page) < len(changes):
            self._presence_ready = True  # the rest: the next response
        if not wires:
            return None  # only its own changes: nothing to tell it
        return PresencePart(wires, used)

    async def _flush(self, write: Write) -> None:
        """Write one response of what waits, never more than `max_bytes` of it.

        Receipts and errors go first; events only once none is left behind, so a receipt
        never trails the events its message caused. The sync goes when it fits beside
        them, or alone. An event too large for any response goes as its `omitted` marker.
        """
        room = self._max_bytes
        welcome, self._welcome = self._welcome, None
        if welcome is not None:
            room -= paging.entry_bytes(welcome)
        answers = 0  # receipts and errors: each is small, bounded by the in-flight window
        for waiting in (self._receipts, self._errors):
            taken = 0
            for answer in waiting:
                cost = paging.entry_bytes(answer)
                if cost > room and answers:
                    break
                room -= cost
                taken += 1
                answers += 1
            if taken < len(waiting):
                break
        receipts, self._receipts = self._receipts[:answers], self._receipts[answers:]
        errors = self._errors[: answers - len(receipts)]
        del self._errors[: len(errors)]
        response = pb.ConnectResponse(welcome=welcome, receipts=receipts, errors=errors)
        presence: PresencePart | None = None
        events: list[bytes] = []  # entries of `response.events`, each encoded once (wire)
        if not (self._receipts or self._errors):
            if self._sync is not None:
                cost = paging.entry_bytes(self._sync)
                if cost <= room or not answers:
                    room -= cost
                    response.training_sync.CopyFrom(self._sync)
                    self._sync = None
            if self._presence_due():
                presence = self._take_presence(room // 2 if self._events else room)
                if presence is not None:
                    room -= presence.used
            while self._events and len(events) < self._per_response:
                event = self._events[0]
                entry = self._wires.of(event)
                if len(entry) > self._max_bytes:
                    entry = wire.event_entry(self._omitted(event))
                if len(entry) > room:
                    break
                room -= len(entry)
                events.append(entry)
                self._events.popleft()
            if self._replay_end is not None and (
                not self._events or self._events[0].seq > self._replay_end
            ):
                # Every replayed event is in this response or an earlier one.
                response.replay_complete.seq = max(self._replay_end, self._replay_floor)
                self._replay_end = None
        if presence is None and not events:
            if response.ByteSize() == 0:
                return  # nothing after all (only the agent's own presence change)
            await write(response)
        elif presence is None:
            await write(wire.response(response, events))
        else:
            await write(
                wire.response(
                    response,
                    events,
                    presence.entries,
                    roster=presence.roster,
                    roster_complete=presence.roster_complete,
                )
            )
        if receipts:
            self._sent_receipts.inc(len(receipts))
        if events:
            self._sent_events.inc(len(events))
        for _ in range(len(receipts) + len(errors)):
            self._window.release()
        self._unanswered -= len(receipts) + len(errors)
        if self._unanswered == 0:
            self._all_answered.set()

    def _omitted(self, event: pb.HubEvent) -> pb.HubEvent:
        """`event` without its body, which no response could carry: the seq goes on."""
        kind = event.WhichOneof("body") or ""
        size = event.ByteSize()
        _OMITTED.warning(
            "%d event(s) larger than a response sent without their body; the latest: "
            "event %d (%s, %d bytes) to %s",
            event.seq,
            kind,
            size,
            self.agent_id,
        )
        marker = pb.HubEvent(
            seq=event.seq,
            sender_id=event.sender_id,
            omitted=pb.EventOmitted(body=kind, event_bytes=size, max_bytes=self._max_bytes),
        )
        marker.create_time.CopyFrom(event.create_time)
        return marker

    def resync(self) -> None:
        """Distrust the live feed (a commit's outcome is unknown): read the log again, after
        what was published (all of it that it is owed is queued, if it was live)."""
        if not self.catching_up:
            self.cursor = max(self.cursor, self._head())
        self.catching_up = True
        self._must_read = True  # what landed may lie above the head: read, however level
        self._joining = None
        self._wake.set()

    async def _read_back(self) -> bool:
        """Fill the queue from the event log; rejoin the live feed once level with it.
        True when the log holds more to read at once (the read stopped at its bound, or a
        Subscribe came during it).

        Everything published before the read began was committed before it, so the read
        sees it; everything published during the read was kept in `_joining`. Together
        they leave no gap, and `cursor` drops what both hold.
        """
        head = self._head()  # every event up to it was committed before the read began
        if self.cursor >= head and not self._must_read:
            # Nothing published after the cursor, and no commit in doubt (a fresh stream
            # from now, or an empty log): level with the live feed without a read.
            self._caught_up()
            return False
        self._joining = []
        epoch, start = self._epoch, self.cursor
        try:
            events = await self._read_log(
                self.cursor, self._replay_page, self._max_bytes, self.subscription
            )
        except BaseException:
            self._joining = None
            raise
        if epoch != self._epoch:
            return True  # a Subscribe came during the read: read again with the new one
        joining, self._joining = self._joining, None
        for event in events:
            if event.seq > self.cursor:
                self._events.append(event)
                self.cursor = event.seq
        # A read cut short by its scan bound saw every row up to `through` that will ever
        # exist (`HubStore.events_for`): what it is owed there is in this page.
        self.cursor = max(self.cursor, events.through)
        if not events.more and joining is not None:
            # The read reached the log's end: nothing up to `head` is owed any more, even
            # where the filter let nothing through (so a resume or a pin starts from here).
            self.cursor = max(self.cursor, head)
            for event in joining:
                if event.seq > self.cursor:
                    self._events.append(event)
                    self.cursor = event.seq
            self._must_read = False
            self._caught_up()
        # (No progress: what lies beyond is not yet published; look again after the poll.)
        return events.more and self.cursor > start

    def _caught_up(self) -> None:
        self.catching_up = False
        if not self._replayed:
            self._replayed = True
            self._replay_end = self.cursor


async def stop_sender(connection: Connection, sender: asyncio.Task[None]) -> None:
    """Let the sender finish the write it is in before the stream's status goes out.

    Cancelling it inside `context.write` leaves grpc unable to send the final
    status, and the peer waits for it forever; so ask it to stop, and cancel
    only a sender stuck behind a peer that does not read.
    """
    connection.stop_sending()
    done, _ = await asyncio.wait([sender], timeout=STOP_SENDER_SECONDS)
    if not done:
        sender.cancel()
    # Whatever ended it (a write to a peer that vanished raises), teardown goes on.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await sender

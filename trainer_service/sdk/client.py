"""Asyncio client for the hub: one long-lived Connect stream that survives
network trouble, plus the query RPCs.

The stream is owned by one supervisor task. Per session it runs exactly one
reader (`call.read()`) and one writer (draining a bounded queue into
`call.write()`), so nothing ever writes from two tasks. Every send gets a
`message_id` and waits for its Receipt; unacknowledged messages are kept and,
after a reconnect, resent with their original ids (the hub acknowledges a
repeated id again without storing twice). Events are deduplicated by `seq`.

Do not await a send from inside the `events()` loop while the inbound buffer
may be full: the receipt arrives on the same stream behind the events that
filled it. Hand such work to another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, TypeAlias, TypeVar, cast

import grpc
import grpc.aio

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc
from trainer_service.sdk.errors import (
    ClientClosed,
    ConnectionLost,
    DeadlineExceeded,
    FailedPrecondition,
    HubError,
    OutOfRange,
    ResourceExhausted,
    Superseded,
    Unavailable,
    error_from_request_error,
    error_from_rpc,
    make_error,
)
from trainer_service.sdk.targets import parse_hub_target

if TYPE_CHECKING:
    from generated.kernelhub.v1.hub_pb2_grpc import HubServiceAsyncStub

DEFAULT_TARGET: Final = "localhost:50051"
# What the client announces in Hello and in its user agent: the installed distribution's
# version (pyproject.toml is its one source).
VERSION: Final = importlib.metadata.version("kernelhub")

Inbound: TypeAlias = pb.HubEvent | pb.TrainingSync
_Call: TypeAlias = "grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]"
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

# Stream failures worth reconnecting for. Everything else (bad token, wrong
# agent id, malformed Hello, unknown method) will fail the same way again.
# INTERNAL: grpc.aio reports a write that fails as the hub ends the call that way,
# hiding the hub's own status. RESOURCE_EXHAUSTED: too many connects or connections.
_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# How often a message refused with UNAVAILABLE is sent again before giving up.
_MAX_REQUEST_RETRIES: Final = 3
# How many streams may die while a message is the oldest unanswered one before
# that message is failed: one that kills the stream every time must not loop forever.
_MAX_STRIKES: Final = 5
_MAX_BACKOFF_EXPONENT: Final = 16
# A stream that stayed up this long (seconds) resets the reconnect backoff; one lost sooner
# does not, or a replica that welcomes and drops every stream gets reconnects every 100 ms.
_STABLE_STREAM_SECONDS: Final = 10.0
# Caps for the bounded waits in shutdown.
_WRITER_STOP_SECONDS: Final = 1.0
_DONE_WRITING_SECONDS: Final = 1.0
# Requests per stream message at most, below the hub's own limit (Welcome.max_batch_requests).
_MAX_BATCH: Final = 64
_MAX_BATCH_BYTES: Final = 1024 * 1024
_BATCHES_REMEMBERED: Final = 1024


class _End:
    """Wakes an `events()` consumer blocked on an empty buffer."""


_END: Final = _End()

# The query RPCs are read-only, so the channel retries them on UNAVAILABLE (a hub
# restarting, a connection reset) within each call's own deadline. Connect is not
# listed: the supervisor reconnects the stream and resends by message_id itself.
_QUERY_METHODS: Final = (
    "ListAgents",
    "ListArtifacts",
    "GetArtifact",
    "ListCollaborations",
    "ListFeatureRequests",
    "GetHubStats",
)
_QUERY_SERVICE_CONFIG: Final = {
    "methodConfig": [
        {
            "name": [
                {"service": pb.DESCRIPTOR.services_by_name["HubService"].full_name, "method": m}
                for m in _QUERY_METHODS
            ],
            "retryPolicy": {
                "maxAttempts": 5,  # gRPC's own cap
                "initialBackoff": "0.2s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


@dataclass(frozen=True)
class HistoryGap:
    """Events this client never received because the hub had pruned them (retention):
    every seq after `after_seq` and before `oldest_seq` (the oldest the hub still held; 0
    if it did not say). After a refused resume the client started afresh from now, at
    `restart_seq` (the new Welcome's head; 0 until it came), so the seqs up to it were
    skipped too. The knowledge base (the training sync, `list_artifacts` and the other
    queries) holds what lasts of that history."""

    after_seq: int
    oldest_seq: int
    restart_seq: int = 0


@dataclass
class _Pending:
    request: pb.ConnectRequest
    future: asyncio.Future[pb.Receipt]
    written_in: int = 0  # generation of the session that last wrote it; 0 = never
    write_order: int = 0  # when it was last written, across all sessions
    strikes: int = 0
    retries: int = 0


@dataclass
class _Session:
    generation: int
    call: _Call


def _as_one(requests: list[pb.ConnectRequest]) -> pb.ConnectRequest:
    """One request as itself; several as a RequestBatch (the hub answers each by its id)."""
    if len(requests) == 1:
        return requests[0]
    return pb.ConnectRequest(
        message_id=f"batch-{uuid.uuid4().hex}", batch=pb.RequestBatch(requests=requests)
    )


def _body_name(request: pb.ConnectRequest) -> str:
    return request.WhichOneof("body") or "empty"


def _follows_presence(subscription: pb.Subscription) -> bool:
    kinds = subscription.event_kinds
    return not kinds or pb.EVENT_KIND_PRESENCE in kinds


def _is_transient(error: HubError) -> bool:
    if isinstance(error, ConnectionLost | Superseded | ClientClosed):
        return False
    return error.code in _TRANSIENT_CODES


def _clone(error: HubError, message_id: str = "") -> HubError:
    """A fresh instance per waiter, so tracebacks of different tasks don't pile up on one object."""
    copy = type(error)(
        error.message,
        code=error.code,
        message_id=message_id or error.message_id,
        field_violations=error.field_violations,
    )
    copy.__cause__ = error.__cause__
    return copy


class HubClient:
    """A trainer's connection to the hub. Use as `async with HubClient(...) as hub:`.

    `target` is one hub (`host:port`, any gRPC target) or several replicas of one hub: IP
    addresses `10.0.0.1:50051,10.0.0.2:50051`, or `dns:///name:port` for every record of a
    name (`targets.parse_hub_target`). With several, the channel connects to one at random
    and a lost stream reconnects to another (gRPC's pick_first policy), resuming by seq.

    With `stream=False` only the query RPCs are available (no Hello, no session),
    e.g. for dashboards and the swarm's final statistics.
    """

    def __init__(
        self,
        target: str,
        agent_id: str,
        token: str,
        *,
        specialization: pb.Specialization.ValueType = pb.SPECIALIZATION_UNSPECIFIED,
        capabilities: Sequence[str] = (),
        version: str = VERSION,
        resume_after_seq: int = 0,
        skip_history: bool | None = None,
        subscription: pb.Subscription | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        stream: bool = True,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 60.0,
        send_timeout: float = 60.0,
        query_timeout: float = 10.0,
        close_timeout: float = 5.0,
        send_window: int = 256,
        inbound_buffer: int = 1024,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        keepalive_seconds: float = 30.0,
        keepalive_timeout_seconds: float = 20.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        if not agent_id:
            raise ValueError("agent_id must not be empty")
        if not token:
            raise ValueError("token must not be empty")
        if stream and specialization == pb.SPECIALIZATION_UNSPECIFIED:
            raise ValueError("a streaming client needs a specialization")
        if send_window < 1 or inbound_buffer < 1:
            raise ValueError("send_window and inbound_buffer must be at least 1")
        if resume_after_seq < 0:
            raise ValueError("resume_after_seq must not be negative")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("reconnect_timeout", reconnect_timeout),
            ("send_timeout", send_timeout),
            ("query_timeout", query_timeout),
            ("close_timeout", close_timeout),
            ("backoff_base", backoff_base),
            ("backoff_cap", backoff_cap),
            ("keepalive_seconds", keepalive_seconds),
            ("keepalive_timeout_seconds", keepalive_timeout_seconds),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")

        # Raises ValueError for a malformed address or list, before anything is opened.
        self._hub = parse_hub_target(target)
        self.target = target
        self.agent_id = agent_id
        self._specialization = specialization
        self._capabilities = list(capabilities)
        self._version = version
        self._credentials = credentials
        self._stream = stream
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._send_timeout = send_timeout
        self._query_timeout = query_timeout
        self._close_timeout = close_timeout
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._keepalive_ms = int(keepalive_seconds * 1000)
        self._keepalive_timeout_ms = int(keepalive_timeout_seconds * 1000)
        self._max_message_bytes = max_message_bytes
        self._rng = rng if rng is not None else random.Random()
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),)
        self._log = logging.LoggerAdapter(logging.getLogger(__name__), {"agent_id": agent_id})

        self._last_seq = resume_after_seq
        # Where the first Hello starts: a fresh agent (no seq to resume after) from now unless
        # told `skip_history=False` (from the oldest event the hub holds). Reconnects resume
        # from _last_seq, unless the hub refused that resume (OUT_OF_RANGE): then from now.
        self._skip_next = resume_after_seq == 0 if skip_history is None else skip_history
        self._history_gap: HistoryGap | None = None
        # What the stream receives (None: everything); in every Hello, so a reconnect's
        # replay applies it too. `subscribe` replaces it.
        self._subscription = subscription
        # Who is online, from presence: the roster being received, then the one in force.
        self._online: dict[str, pb.AgentInfo] = {}
        self._roster: dict[str, pb.AgentInfo] | None = None
        self._roster_complete = asyncio.Event()
        self._last_processed_seq = resume_after_seq
        self._welcome: pb.Welcome | None = None
        self._replayed = asyncio.Event()
        self._replay_seq = 0
        self._latest_sync: pb.TrainingSync | None = None
        self._duplicates_dropped = 0
        self._stream_messages = 0
        self._batches: dict[str, list[str]] = {}  # batch message_id -> its messages' ids
        self._reconnects = 0

        self._channel: grpc.aio.Channel | None = None
        self._stub: HubServiceAsyncStub | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._close_event = asyncio.Event()
        self._started = False
        self._closed = False
        self._connected = False
        self._terminal: HubError | None = None
        self._generation = 0
        self._writes = 0

        self._pending: dict[str, _Pending] = {}
        self._window = asyncio.Semaphore(send_window)
        # None tells the writer to half-close the stream and stop.
        self._outbound: asyncio.Queue[str | None] = asyncio.Queue(maxsize=2 * send_window)
        self._inbound: asyncio.Queue[Inbound | _End] = asyncio.Queue(maxsize=inbound_buffer)
        self._retry_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Highest event seq put in the inbound buffer; what a reconnect resumes after."""
        return self._last_seq

    @property
    def subscription(self) -> pb.Subscription | None:
        """What the stream receives (None: everything)."""
        return self._subscription

    @property
    def online(self) -> dict[str, pb.AgentInfo]:
        """Who is online, other than this agent, as the hub's presence says (a copy): the
        latest complete roster with the changes since (empty when not subscribed to it)."""
        return dict(self._online)

    @property
    def roster_complete(self) -> asyncio.Event:
        """Set once this stream's roster has arrived (`online` is then the hub's view)."""
        return self._roster_complete

    @property
    def last_processed_seq(self) -> int:
        """Seq of the last event `events()` yielded; persist it to resume a later process."""
        return self._last_processed_seq

    @property
    def welcome(self) -> pb.Welcome | None:
        return self._welcome

    @property
    def replayed(self) -> asyncio.Event:
        """Set once the current stream's replay is done (the hub's `replay_complete`): every
        event up to `replay_seq` is buffered, later ones are live. Cleared on reconnect."""
        return self._replayed

    @property
    def replay_seq(self) -> int:
        """The seq the last finished replay reached (0 before any)."""
        return self._replay_seq

    @property
    def history_gap(self) -> HistoryGap | None:
        """The latest run of events the hub had pruned before this client got them (None:
        nothing was missed). Set when a resume was refused as OUT_OF_RANGE, after which the
        client started afresh from now by itself, or when a start from the beginning found
        the log pruned; logged as a warning either way."""
        return self._history_gap

    @property
    def latest_sync(self) -> pb.TrainingSync | None:
        return self._latest_sync

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def terminal_error(self) -> HubError | None:
        """Set once the session is over for good (fatal status, superseded, gave up)."""
        return self._terminal

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def reconnects(self) -> int:
        return self._reconnects

    @property
    def duplicates_dropped(self) -> int:
        return self._duplicates_dropped

    @property
    def stream_messages_written(self) -> int:
        """Stream messages written; several sends waiting at once share one (a batch)."""
        return self._stream_messages

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    async def __aenter__(self) -> HubClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Opens the channel and, for a streaming client, the session: returns once
        the hub has answered Hello with Welcome; raises the typed error if it
        refuses, or ConnectionLost after `connect_timeout` of failed attempts."""
        if self._started:
            raise RuntimeError("HubClient.start() called twice")
        self._started = True
        self._channel = self._make_channel()
        # The generated stub's overloads resolve to the sync type under grpc-stubs.
        self._stub = cast("HubServiceAsyncStub", hub_pb2_grpc.HubServiceStub(self._channel))
        if not self._stream:
            return
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._supervisor = asyncio.create_task(
            self._supervise(), name=f"hub-client-{self.agent_id}"
        )
        try:
            # The supervisor resolves _ready within connect_timeout plus one backoff;
            # the outer bound only guards against a bug there.
            await asyncio.wait_for(
                asyncio.shield(self._ready), self._connect_timeout + self._backoff_cap + 5.0
            )
        except BaseException:
            await self.close()
            raise

    def _make_channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, int | str]] = [
            ("grpc.http2.bdp_probe", 0),
            # A stream window of a whole response: with BDP probing off it stays at gRPC's
            # 64 KiB, and a response over that (a roster, a replay page) waits a window
            # update from this side midway, a round trip and extra writes on both sides.
            ("grpc.http2.lookahead_bytes", self._max_message_bytes),
            ("grpc.keepalive_time_ms", self._keepalive_ms),
            ("grpc.keepalive_timeout_ms", self._keepalive_timeout_ms),
            # The ack deadline of a keepalive ping is this option (default 60 s) in
            # current gRPC, not keepalive_timeout_ms; keep them equal.
            ("grpc.http2.ping_timeout_ms", self._keepalive_timeout_ms),
            # Keep pinging on a quiet stream, or a frozen network goes unnoticed.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 0),
            # Keep the channel's own reconnect backoff in step with ours, or a
            # channel parked in a long backoff fails every attempt fast.
            ("grpc.initial_reconnect_backoff_ms", int(self._backoff_base * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self._backoff_base * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self._backoff_cap * 1000)),
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.primary_user_agent", f"kernelhub-trainer/{VERSION}"),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", self._hub.service_config(_QUERY_SERVICE_CONFIG)),
            *self._hub.channel_options(),
        ]
        target = self._hub.target
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    async def close(self) -> None:
        """Half-closes the stream so the hub can finish cleanly, fails whatever is
        still waiting for a receipt with ClientClosed, and closes the channel."""
        if self._closed:
            return
        self._closed = True
        self._close_event.set()
        if self._supervisor is not None and not self._supervisor.done():
            await asyncio.wait({self._supervisor}, timeout=self._close_timeout)
            if not self._supervisor.done():
                self._supervisor.cancel()
                await asyncio.wait({self._supervisor}, timeout=self._close_timeout)
        await self._cancel_retries()
        closed = ClientClosed("the client was closed before the hub acknowledged this message")
        for message_id in list(self._pending):
            self._settle_error(message_id, _clone(closed, message_id))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_clone(closed))
            self._ready.exception()  # retrieved: start() reports it, nobody else waits
        self._wake_consumer()
        self._connected = False
        if self._channel is not None:
            await self._channel.close(None)

    async def _cancel_retries(self) -> None:
        for task in self._retry_tasks:
            task.cancel()
        if self._retry_tasks:
            await asyncio.wait(set(self._retry_tasks), timeout=self._close_timeout)

    # ------------------------------------------------------------------
    # Sending
    # ------------------------------------------------------------------

    async def send(self, request: pb.ConnectRequest) -> pb.Receipt:
        """Sends one message and waits for its receipt. The caller may choose the
        message_id (to stay idempotent across its own restarts); the typed
        helpers below generate one."""
        if not request.message_id:
            raise ValueError("request.message_id must be set")
        if request.WhichOneof("body") in (None, "hello"):
            raise ValueError("send a message body other than Hello; the client sends Hello itself")
        if request.HasField("batch"):
            raise ValueError("send messages one by one; the client batches what is waiting itself")
        if request.message_id in self._pending:
            raise ValueError(f"message {request.message_id} is already in flight")
        self._check_can_send()
        size = request.ByteSize()
        if size > self._max_message_bytes:
            # The hub would end the whole stream over it, again after every reconnect.
            raise ResourceExhausted(
                f"{_body_name(request)} is {size} bytes; the limit is {self._max_message_bytes}",
                message_id=request.message_id,
            )
        message_id = request.message_id
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._window.acquire()
                entry: _Pending | None = None
                try:
                    self._check_can_send()
                    entry = _Pending(request, asyncio.get_running_loop().create_future())
                    self._pending[message_id] = entry
                    await self._outbound.put(message_id)
                    return await entry.future
                finally:
                    if entry is None:
                        self._window.release()
                    elif self._pending.get(message_id) is entry:
                        self._forget(message_id)
        except TimeoutError as exc:
            raise DeadlineExceeded(
                f"no receipt for {_body_name(request)} within {self._send_timeout:g}s",
                message_id=message_id,
            ) from exc

    def _check_can_send(self) -> None:
        if not self._stream:
            raise RuntimeError("this HubClient was created with stream=False")
        if not self._started:
            raise RuntimeError("HubClient is not started; use `async with HubClient(...)`")
        if self._terminal is not None:
            raise _clone(self._terminal)
        if self._closed:
            raise ClientClosed("the client is closed")

    async def _send_body(self, **body: object) -> pb.Receipt:
        request = pb.ConnectRequest(message_id=uuid.uuid4().hex, **body)  # type: ignore[arg-type]
        return await self.send(request)

    async def subscribe(self, subscription: pb.Subscription | None) -> int:
        """Replace what the stream receives (None or empty: everything); returns the seq it
        takes effect after: events at or below it were chosen by the old subscription,
        later ones by the new. Reconnects use the new one from now on."""
        followed = self._subscription is None or _follows_presence(self._subscription)
        follows = subscription is None or _follows_presence(subscription)
        self._subscription = subscription
        if follows and not followed:
            self._roster = {}  # the hub sends the roster again
            self._roster_complete.clear()
        receipt = await self._send_body(subscribe=pb.Subscribe(subscription=subscription))
        if not follows:
            self._online.clear()
        return receipt.seq

    async def share_pattern(self, pattern: pb.Pattern) -> pb.Receipt:
        """resource_id is the artifact id."""
        return await self._send_body(share_pattern=pb.SharePattern(pattern=pattern))

    async def share_code_component(self, component: pb.CodeComponent) -> pb.Receipt:
        """resource_id is the artifact id."""
        return await self._send_body(
            share_code_component=pb.ShareCodeComponent(code_component=component)
        )

    async def share_os_component(self, component: pb.OsComponent) -> pb.Receipt:
        """resource_id is the artifact id."""
        return await self._send_body(share_os_component=pb.ShareOsComponent(os_component=component))

    async def request_feature(
        self, feature: str, requirements: pb.FeatureRequirements, description: str = ""
    ) -> pb.Receipt:
        """resource_id is the request id that deliveries will name."""
        return await self._send_body(
            request_feature=pb.RequestFeature(
                feature=feature, requirements=requirements, description=description
            )
        )

    async def deliver_feature(self, request_id: str, component: pb.OsComponent) -> pb.Receipt:
        """resource_id is the stored component's artifact id."""
        return await self._send_body(
            deliver_feature=pb.DeliverFeature(request_id=request_id, component=component)
        )

    async def propose_collaboration(
        self,
        target_agent_id: str,
        type: pb.CollaborationType.ValueType,
        description: str = "",
    ) -> pb.Receipt:
        """resource_id is the session id."""
        return await self._send_body(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id=target_agent_id, type=type, description=description
            )
        )

    async def accept_collaboration(self, session_id: str) -> pb.Receipt:
        return await self._send_body(
            accept_collaboration=pb.AcceptCollaboration(session_id=session_id)
        )

    async def decline_collaboration(self, session_id: str, reason: str = "") -> pb.Receipt:
        return await self._send_body(
            decline_collaboration=pb.DeclineCollaboration(session_id=session_id, reason=reason)
        )

    async def report_progress(self, session_id: str, progress: float, note: str = "") -> pb.Receipt:
        return await self._send_body(
            report_collaboration_progress=pb.ReportCollaborationProgress(
                session_id=session_id, progress=progress, note=note
            )
        )

    async def complete_collaboration(
        self, session_id: str, component: pb.OsComponent
    ) -> pb.Receipt:
        """resource_id is the collaborative component's artifact id."""
        return await self._send_body(
            complete_collaboration=pb.CompleteCollaboration(
                session_id=session_id, component=component
            )
        )

    # ------------------------------------------------------------------
    # Receiving
    # ------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Inbound]:
        """HubEvents (deduplicated, increasing seq) and TrainingSyncs in arrival order.

        Ends when the client is closed; raises the terminal error (Superseded,
        ConnectionLost, Unauthenticated, ...) after yielding what was buffered.
        One consumer at a time.
        """
        if not self._stream:
            raise RuntimeError("this HubClient was created with stream=False")
        while not self._closed:
            if self._inbound.empty() and self._terminal is not None:
                raise _clone(self._terminal)
            item = await self._inbound.get()
            if isinstance(item, _End):
                continue
            if isinstance(item, pb.HubEvent):
                self._last_processed_seq = item.seq
            yield item

    def _wake_consumer(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._inbound.put_nowait(_END)

    # ------------------------------------------------------------------
    # Supervisor: connect, run, reconnect
    # ------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        failing_since = loop.time()
        give_up_after = self._connect_timeout
        last_error: HubError | None = None
        try:
            while not self._close_event.is_set():
                try:
                    session = await self._open_session()
                except OutOfRange as error:
                    if self._skip_next:
                        raise  # a start from now is never refused: a hub out of step
                    self._restart_from_now(error)
                    continue
                except HubError as error:
                    if not _is_transient(error):
                        raise
                    last_error = error
                else:
                    if self._generation > 1:
                        self._reconnects += 1
                    give_up_after = self._reconnect_timeout
                    self._connected = True
                    if self._ready is not None and not self._ready.done():
                        self._ready.set_result(None)
                    opened = loop.time()
                    try:
                        ended = await self._run_session(session)
                    finally:
                        self._connected = False
                    if ended is None:
                        return  # closed cleanly
                    if loop.time() - opened >= _STABLE_STREAM_SECONDS:
                        attempt = 0
                    self._strike_head_of_line(session)
                    last_error = ended
                    failing_since = loop.time()
                    self._log.warning("hub stream interrupted (%s); reconnecting", ended)

                elapsed = loop.time() - failing_since
                if elapsed >= give_up_after:
                    raise ConnectionLost(
                        f"could not reach the hub at {self.target} for {elapsed:.1f}s"
                        + (f"; last error: {last_error}" if last_error else "")
                    ) from last_error
                ceiling = min(
                    self._backoff_cap,
                    self._backoff_base * 2 ** min(attempt, _MAX_BACKOFF_EXPONENT),
                )
                delay = min(self._rng.uniform(0.0, ceiling), give_up_after - elapsed)
                attempt += 1
                self._log.debug("reconnect attempt %d in %.2fs (%s)", attempt, delay, last_error)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_event.wait(), timeout=delay)
        except HubError as error:
            self._log.debug("hub session ended: %s", error)  # raised to every waiter
            self._fail(error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must still release every waiter
            self._log.exception("hub client supervisor crashed")
            self._fail(make_error(grpc.StatusCode.INTERNAL, f"hub client crashed: {exc!r}"))

    async def _open_session(self) -> _Session:
        """Connect, Hello, and wait for Welcome (bounded by connect_timeout)."""
        assert self._stub is not None
        self._generation += 1
        call: _Call = self._stub.Connect(None, metadata=self._metadata)
        session = _Session(self._generation, call)
        hello = pb.ConnectRequest(
            message_id=uuid.uuid4().hex,
            hello=pb.Hello(
                agent_id=self.agent_id,
                specialization=self._specialization,
                capabilities=self._capabilities,
                version=self._version,
                resume_after_seq=self._last_seq,
                skip_history=self._skip_next,
                subscription=self._subscription,
            ),
        )
        try:
            async with asyncio.timeout(self._connect_timeout):
                await call.write(hello)
                first = await call.read()
        except TimeoutError as exc:
            call.cancel()
            raise Unavailable(
                f"no Welcome from {self.target} within {self._connect_timeout:g}s"
            ) from exc
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        except asyncio.InvalidStateError as exc:  # the RPC ended before Hello went out
            raise await self._status_error(call, "the hub ended the stream before Welcome") from exc
        except BaseException:
            call.cancel()
            raise
        if not isinstance(first, pb.ConnectResponse):
            raise await self._status_error(call, "the hub ended the stream before Welcome")
        if not first.HasField("welcome"):
            call.cancel()
            raise FailedPrecondition("the hub's first response did not carry Welcome")
        if self._skip_next:
            # History was skipped up to the head: a reconnect resumes from there.
            self._last_seq = self._last_processed_seq = max(self._last_seq, first.welcome.head_seq)
            self._skip_next = False
            if self._history_gap is not None and not self._history_gap.restart_seq:
                self._history_gap = replace(self._history_gap, restart_seq=self._last_seq)
                self._log.warning(
                    "restarted from now: events after seq %d up to seq %d were skipped",
                    self._history_gap.after_seq,
                    self._last_seq,
                )
        elif first.welcome.oldest_seq > self._last_seq + 1:
            # From the beginning (a resume below the mark is refused): the log starts later.
            self._history_gap = HistoryGap(self._last_seq, first.welcome.oldest_seq)
            self._log.warning(
                "the hub's event log starts at seq %d: events after seq %d before it were "
                "pruned (the knowledge base has what lasts)",
                first.welcome.oldest_seq,
                self._last_seq,
            )
        self._welcome = first.welcome
        self._replayed.clear()  # this stream replays anew
        self._roster = {}  # and sends its roster anew
        self._roster_complete.clear()
        self._log.info(
            "connected to %s (hub %s, head seq %d, resuming after %d, %d unacknowledged)",
            self.target,
            first.welcome.hub_version or "?",
            first.welcome.head_seq,
            self._last_seq,
            len(self._pending),
        )
        try:
            await self._handle_response(first)
        except BaseException:
            call.cancel()
            raise
        return session

    def _restart_from_now(self, refusal: OutOfRange) -> None:
        """The hub no longer holds every event after our seq: start afresh from now (the
        snapshot is the knowledge base), saying what was lost."""
        self._history_gap = HistoryGap(self._last_seq, refusal.oldest_seq)
        self._skip_next = True
        self._log.warning(
            "resume after seq %d refused: the hub's event log starts at seq %s (older events "
            "were pruned); starting afresh from now, the knowledge base (training sync, "
            "list_artifacts and the other queries) has what lasts",
            self._last_seq,
            refusal.oldest_seq or "?",
        )

    async def _status_error(self, call: _Call, eof_message: str) -> HubError:
        try:
            async with asyncio.timeout(self._connect_timeout):
                code = await call.code()
                details = await call.details()
        except TimeoutError:
            call.cancel()
            return Unavailable(eof_message)
        if code == grpc.StatusCode.OK:
            return Unavailable(eof_message)
        if code == grpc.StatusCode.ABORTED:
            return Superseded(details or "another connection for this agent took over")
        return make_error(code, details or code.name)

    async def _run_session(self, session: _Session) -> HubError | None:
        """Runs reader and writer until one stops. Returns None after a clean close,
        the error for a transient failure; raises a fatal one."""
        reader = asyncio.create_task(self._read_loop(session), name=f"hub-read-{self.agent_id}")
        writer = asyncio.create_task(self._write_loop(session), name=f"hub-write-{self.agent_id}")
        closing = asyncio.create_task(self._close_event.wait())
        try:
            await asyncio.wait({reader, writer, closing}, return_when=asyncio.FIRST_COMPLETED)
            if closing.done():
                await self._shutdown_session(session, reader, writer)
                return None
            if writer.done() and not reader.done():
                # A failed write means the RPC is over; the reader knows why.
                await asyncio.wait({reader}, timeout=self._connect_timeout)
            return self._session_error(session, reader)
        finally:
            for task in (reader, writer, closing):
                task.cancel()
            await asyncio.wait({reader, writer, closing}, timeout=self._close_timeout)
            session.call.cancel()

    def _session_error(self, session: _Session, reader: asyncio.Task[None]) -> HubError:
        if not reader.done():
            return Unavailable("the hub stream stopped responding")
        if reader.cancelled():
            return Unavailable("the hub stream was cancelled")
        exc = reader.exception()
        if exc is None:
            return Unavailable("the hub ended the stream")
        if isinstance(exc, grpc.aio.AioRpcError):
            error = error_from_rpc(exc)
            if _is_transient(error):
                return error
            raise error from exc
        if isinstance(exc, HubError):
            raise exc
        raise make_error(grpc.StatusCode.INTERNAL, f"hub stream reader failed: {exc!r}") from exc

    async def _shutdown_session(
        self, session: _Session, reader: asyncio.Task[None], writer: asyncio.Task[None]
    ) -> None:
        """Half-close via the writer (the only task allowed to touch writes), then give
        the hub a moment to acknowledge what it already has and end the stream."""
        if not writer.done():
            try:
                self._outbound.put_nowait(None)
            except asyncio.QueueFull:
                writer.cancel()
            await asyncio.wait({writer}, timeout=_WRITER_STOP_SECONDS + _DONE_WRITING_SECONDS)
        if not reader.done() and self._pending:
            await asyncio.wait({reader}, timeout=self._close_timeout / 2)

    async def _read_loop(self, session: _Session) -> None:
        while True:
            response = await session.call.read()
            if not isinstance(response, pb.ConnectResponse):
                return
            await self._handle_response(response)

    async def _write_loop(self, session: _Session) -> None:
        resend = [m for m, p in self._pending.items() if p.written_in != session.generation]
        if resend:
            self._log.info("resending %d unacknowledged message(s)", len(resend))
        limit = self._batch_limit()
        for start in range(0, len(resend), limit):
            await self._write(session, resend[start : start + limit])
        while True:
            queued = await self._outbound.get()
            # Whatever else is already waiting goes in the same stream message (a batch):
            # a gRPC message costs about the same whatever it carries.
            ready = [queued]
            while queued is not None and len(ready) < self._batch_limit():
                try:
                    queued = self._outbound.get_nowait()
                except asyncio.QueueEmpty:
                    break
                ready.append(queued)
            await self._write(session, [m for m in ready if m is not None])
            if queued is None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await asyncio.wait_for(
                        session.call.done_writing(), timeout=_DONE_WRITING_SECONDS
                    )
                return

    def _batch_limit(self) -> int:
        """Requests per stream message: what the hub accepts (1 for a hub without batches)."""
        welcome = self._welcome
        return max(1, min(welcome.max_batch_requests, _MAX_BATCH) if welcome else 1)

    async def _write(self, session: _Session, message_ids: list[str]) -> None:
        """Writes pending messages once per session, several as one RequestBatch; queue
        entries for messages already answered or already written in this session are skipped."""
        requests: list[pb.ConnectRequest] = []
        size = 0
        for message_id in message_ids:
            entry = self._pending.get(message_id)
            if entry is None or entry.written_in == session.generation:
                continue  # answered, or already written (an id can be queued twice)
            self._writes += 1
            entry.written_in = session.generation
            entry.write_order = self._writes
            # Each request was checked against the message limit alone. Batching pays off
            # for small messages only, so a batch stays far below any hub's limit.
            entry_size = entry.request.ByteSize() + 16
            if requests and size + entry_size > _MAX_BATCH_BYTES:
                await self._write_one(session, requests)
                requests, size = [], 0
            requests.append(entry.request)
            size += entry_size
        if requests:
            await self._write_one(session, requests)

    async def _write_one(self, session: _Session, requests: list[pb.ConnectRequest]) -> None:
        self._stream_messages += 1
        message = _as_one(requests)
        if len(requests) > 1:
            # Remembered (the latest few) in case the hub refuses the batch as a whole.
            self._batches[message.message_id] = [r.message_id for r in requests]
            while len(self._batches) > _BATCHES_REMEMBERED:
                del self._batches[next(iter(self._batches))]
        await session.call.write(message)

    def _strike_head_of_line(self, session: _Session) -> None:
        """Blames a dead stream on the oldest message it left unanswered; the
        messages queued behind that one are innocent and keep their chances."""
        written = [p for p in self._pending.values() if p.written_in == session.generation]
        if not written:
            return
        head = min(written, key=lambda p: p.write_order)
        head.strikes += 1
        if head.strikes >= _MAX_STRIKES:
            message_id = head.request.message_id
            self._settle_error(
                message_id,
                Unavailable(
                    f"the hub stream failed {head.strikes} times while "
                    f"{_body_name(head.request)} was waiting for its answer; giving up on it",
                    message_id=message_id,
                ),
            )

    async def _handle_response(self, response: pb.ConnectResponse) -> None:
        """In the contract's field order: welcome, receipts, errors, events, sync; the replay
        marker counts once the events beside it are buffered."""
        if response.HasField("welcome"):
            self._welcome = response.welcome
        for receipt in response.receipts:
            self._settle_receipt(receipt)
        for error in response.errors:
            self._on_request_error(error)
        closing = self._close_event.is_set()
        for event in response.events:
            if event.seq <= self._last_seq:
                self._duplicates_dropped += 1
                continue
            if closing:
                break  # not buffered, so not counted in last_seq: a later session replays it
            await self._inbound.put(event)
            self._last_seq = event.seq
        if response.HasField("replay_complete") and not closing:
            self._replay_seq = response.replay_complete.seq
            # Everything up to it was sent: a reconnect resumes after it, not after the last
            # event a filter let through (which may be long gone from the log).
            self._last_seq = max(self._last_seq, self._replay_seq)
            self._replayed.set()
        if response.HasField("training_sync"):
            self._latest_sync = response.training_sync
            if not closing:
                await self._inbound.put(response.training_sync)
        if response.HasField("presence"):
            self._on_presence(response.presence)

    def _on_presence(self, update: pb.PresenceUpdate) -> None:
        """The roster replaces what an earlier stream said; changes apply to it."""
        if update.roster and self._roster is None:
            self._roster = {}  # a roster again (see PresenceUpdate.roster): start afresh
        view = self._roster if self._roster is not None else self._online
        for agent_id in update.offline:
            view.pop(agent_id, None)
        for agent in update.online:
            view[agent.agent_id] = agent
        if update.roster_complete and self._roster is not None:
            self._online, self._roster = self._roster, None
            self._roster_complete.set()

    # ------------------------------------------------------------------
    # Pending bookkeeping
    # ------------------------------------------------------------------

    def _forget(self, message_id: str) -> _Pending | None:
        entry = self._pending.pop(message_id, None)
        if entry is not None:
            self._window.release()
        return entry

    def _settle_receipt(self, receipt: pb.Receipt) -> None:
        entry = self._forget(receipt.message_id)
        if entry is None:
            self._log.debug("receipt for unknown message %s ignored", receipt.message_id)
            return
        if not entry.future.done():
            entry.future.set_result(receipt)

    def _settle_error(self, message_id: str, error: HubError) -> None:
        entry = self._forget(message_id)
        if entry is not None and not entry.future.done():
            entry.future.set_exception(error)

    def _on_request_error(self, refusal: pb.RequestError) -> None:
        error = error_from_request_error(refusal)
        inner = self._batches.pop(refusal.message_id, None)
        if inner is not None:
            # A batch refused whole (the hub handled none of it): its messages share the error.
            self._log.warning("hub refused a batch of %d: %s", len(inner), error)
            for message_id in inner:
                self._settle_error(message_id, _clone(error, message_id))
            return
        entry = self._pending.get(refusal.message_id)
        if entry is None:
            self._log.warning("hub refused an unknown message: %s", error)
            return
        if isinstance(error, Unavailable) and entry.retries < _MAX_REQUEST_RETRIES:
            entry.retries += 1
            entry.written_in = 0
            delay = self._rng.uniform(
                0.0, min(self._backoff_cap, self._backoff_base * 2**entry.retries)
            )
            task = asyncio.create_task(self._resend_later(refusal.message_id, delay))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
            return
        self._settle_error(refusal.message_id, error)

    async def _resend_later(self, message_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        if message_id in self._pending and not self._close_event.is_set():
            await self._outbound.put(message_id)

    def _fail(self, error: HubError) -> None:
        """The session is over for good: every waiter learns why."""
        if self._terminal is None:
            self._terminal = error
        for message_id in list(self._pending):
            self._settle_error(message_id, _clone(error, message_id))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(_clone(error))
        self._wake_consumer()

    # ------------------------------------------------------------------
    # Query RPCs
    # ------------------------------------------------------------------

    def _require_stub(self) -> HubServiceAsyncStub:
        if self._stub is None or self._closed:
            raise RuntimeError("HubClient is not started (or already closed)")
        return self._stub

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        timeout: float | None,
    ) -> _Resp:
        try:
            response = await method(
                request,
                timeout=timeout if timeout is not None else self._query_timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        return cast(_Resp, response)

    async def list_agents(
        self,
        *,
        online_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListAgentsResponse:
        stub = self._require_stub()
        request = pb.ListAgentsRequest(
            online_only=online_only, page_size=page_size, page_token=page_token
        )
        return await self._unary(stub.ListAgents, request, timeout)

    async def list_artifacts(
        self,
        *,
        kind: pb.ArtifactKind.ValueType = pb.ARTIFACT_KIND_UNSPECIFIED,
        specialization: pb.Specialization.ValueType = pb.SPECIALIZATION_UNSPECIFIED,
        contributor_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListArtifactsResponse:
        stub = self._require_stub()
        request = pb.ListArtifactsRequest(
            kind=kind,
            specialization=specialization,
            contributor_id=contributor_id,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._unary(stub.ListArtifacts, request, timeout)

    async def iter_artifacts(
        self,
        *,
        kind: pb.ArtifactKind.ValueType = pb.ARTIFACT_KIND_UNSPECIFIED,
        specialization: pb.Specialization.ValueType = pb.SPECIALIZATION_UNSPECIFIED,
        contributor_id: str = "",
        page_size: int = 100,
        max_pages: int = 1000,
    ) -> AsyncIterator[pb.Artifact]:
        """Every matching artifact, newest first, following next_page_token for at
        most `max_pages` pages (a hub that repeats a token is an error, not a loop)."""
        token = ""
        seen: set[str] = set()
        for _ in range(max_pages):
            page = await self.list_artifacts(
                kind=kind,
                specialization=specialization,
                contributor_id=contributor_id,
                page_size=page_size,
                page_token=token,
            )
            for artifact in page.artifacts:
                yield artifact
            token = page.next_page_token
            if not token:
                return
            if token in seen:
                raise make_error(
                    grpc.StatusCode.INTERNAL, f"the hub returned page token {token!r} twice"
                )
            seen.add(token)
        self._log.warning("iter_artifacts stopped after %d pages", max_pages)

    async def get_artifact(self, artifact_id: str, *, timeout: float | None = None) -> pb.Artifact:
        stub = self._require_stub()
        response: pb.GetArtifactResponse = await self._unary(
            stub.GetArtifact, pb.GetArtifactRequest(artifact_id=artifact_id), timeout
        )
        return response.artifact

    async def list_collaborations(
        self,
        *,
        agent_id: str = "",
        state: pb.CollaborationState.ValueType = pb.COLLABORATION_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListCollaborationsResponse:
        stub = self._require_stub()
        request = pb.ListCollaborationsRequest(
            agent_id=agent_id, state=state, page_size=page_size, page_token=page_token
        )
        return await self._unary(stub.ListCollaborations, request, timeout)

    async def list_feature_requests(
        self,
        *,
        requester_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListFeatureRequestsResponse:
        stub = self._require_stub()
        request = pb.ListFeatureRequestsRequest(
            requester_id=requester_id, page_size=page_size, page_token=page_token
        )
        return await self._unary(stub.ListFeatureRequests, request, timeout)

    async def stats(self, *, timeout: float | None = None) -> pb.GetHubStatsResponse:
        stub = self._require_stub()
        return await self._unary(stub.GetHubStats, pb.GetHubStatsRequest(), timeout)

"""Watch streams: an observer's read-only feed of the whole event log, replayed then live.

A watcher is a `Connection` that reads every event (not an agent's share of them) and has
nothing to send but events: the same bounded queue, the same fall-back to the log when it
is slow, the same byte budget per response. It is no agent: it never says Hello, is never
online and never supersedes anyone. Its filter is by event kind (a Watch sees the whole
hub, so a trainer's subscription terms do not apply); presence comes as on Connect.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb

from .auth import current_agent, current_token_hash
from .config import HubConfig
from .connection import Connection, stop_sender
from .errors import StatusError, invalid
from .lingers import Linger
from .metrics import HubMetrics
from .retention import Retention
from .router import Router
from .session import SHUTTING_DOWN, Context
from .state import HubStore

log = logging.getLogger(__name__)

# What `WatchRequest.kinds` may name: the bodies of the events in the log.
KINDS = frozenset(
    field.name
    for field in pb.HubEvent.DESCRIPTOR.oneofs_by_name["body"].fields
    if field.name != "omitted"
)
MAX_KINDS = 16
# Kinds that ask for presence, which is not in the log: WatchResponse.presence carries it.
PRESENCE_KINDS = frozenset({"agent_joined", "agent_left"})


def event_kind(event: pb.HubEvent) -> str:
    """The body's name; for an `omitted` marker, the name of the body it stands for."""
    kind = event.WhichOneof("body") or ""
    return event.omitted.body if kind == "omitted" else kind


def check_request(request: pb.WatchRequest) -> frozenset[str] | None:
    """The kinds to send (None: every kind); INVALID_ARGUMENT naming each bad entry."""
    violations = [
        (f"kinds[{i}]", f"{kind!r} is not an event kind (one of {', '.join(sorted(KINDS))})")
        for i, kind in enumerate(request.kinds)
        if kind not in KINDS
    ]
    if len(request.kinds) > MAX_KINDS:
        violations.append(("kinds", f"at most {MAX_KINDS} entries, got {len(request.kinds)}"))
    if violations:
        raise invalid(violations)
    return frozenset(request.kinds) or None


class Watches:
    """Every live Watch stream of this hub."""

    def __init__(
        self,
        config: HubConfig,
        store: HubStore,
        router: Router,
        retention: Retention,
        budget: int,
        metrics: HubMetrics,
        stream_linger: Linger,
    ) -> None:
        self._config = config
        self._linger = stream_linger  # every stream's (lingers.py)
        self._retention = retention
        self._metrics = metrics
        self._store = store
        self._router = router
        self._budget = budget
        self._draining = False

    async def serve(self, request: pb.WatchRequest, context: Context) -> None:
        """One Watch call: the replay, then live events, until the caller or the hub ends it."""
        if self._draining:
            raise StatusError(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        kinds = check_request(request)
        refusal = self._retention.refusal("after_seq", request.after_seq)
        if not request.skip_history and refusal is not None:
            raise StatusError(grpc.StatusCode.OUT_OF_RANGE, refusal)
        limit = self._config.max_watch_streams
        if self._router.watch_count >= limit:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the hub carries at most {limit} Watch streams; retry later",
            )
        watcher = Connection(
            pb.Hello(  # after_seq is ignored with skip_history
                agent_id=current_agent(),
                resume_after_seq=0 if request.skip_history else request.after_seq,
            ),
            token_hash=current_token_hash(),
            store=self._store,
            max_inflight=1,  # it sends nothing to be answered
            queue_size=self._config.outbound_queue_size,
            events_per_response=self._config.max_events_per_response,
            replay_page_size=self._config.replay_page_size,
            max_bytes=self._budget,
            linger=self._linger,
            read_log=lambda after, limit, max_bytes, _: self._store.events_after(
                after, limit, max_bytes
            ),
            metrics=self._metrics,
            wires=self._router.wires,
            head=lambda: self._router.last_published_seq,
        )
        head = self._router.last_published_seq
        watcher.start_at(request.skip_history, head, self._retention.oldest_seq)
        # Presence is state, not in the log: a watcher gets it as a trainer does.
        self._router.watch(watcher, kinds is None or bool(kinds & PRESENCE_KINDS))
        log.info("%s watching (after seq %d)", watcher.agent_id, watcher.cursor)
        written = False

        async def write(response: pb.ConnectResponse | bytes) -> None:
            nonlocal written
            if isinstance(response, bytes):  # presence, serialized once for every stream
                response = pb.ConnectResponse.FromString(response)
            out = pb.WatchResponse(
                head_seq=response.welcome.head_seq,
                events=[e for e in response.events if kinds is None or event_kind(e) in kinds],
            )
            if response.HasField("replay_complete"):
                out.replay_complete.CopyFrom(response.replay_complete)
            if response.HasField("presence"):
                out.presence.CopyFrom(response.presence)
            if (
                not written
                or out.events
                or out.HasField("replay_complete")
                or out.HasField("presence")
            ):
                written = True
                await context.write(out)

        sender = asyncio.create_task(watcher.run_sender(pb.Welcome(head_seq=head), write))
        ended = asyncio.create_task(watcher.ended.wait())
        try:
            await asyncio.wait([sender, ended], return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and (error := sender.exception()) is not None:
                raise error
        finally:
            self._router.unwatch(watcher)
            ended.cancel()
            await asyncio.shield(stop_sender(watcher, sender))
            log.info("%s stopped watching", watcher.agent_id)
        if watcher.end_status is not None:
            await context.abort(*watcher.end_status)

    def drain(self) -> None:
        """End every Watch stream: the hub is stopping (the caller resumes from its last seq)."""
        self._draining = True
        for watcher in self._router.watchers():
            watcher.end(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

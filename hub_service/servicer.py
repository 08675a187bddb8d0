"""HubService: the Connect stream and the query RPCs.

The data path of a trainer message reads top to bottom: stream in ->
validate -> persist (group commit) -> route (router) -> stream out (the
connection's sender).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from . import __version__, paging
from . import commands as cmd
from .auth import current_agent, current_token_hash
from .collaboration import Step
from .committer import GroupCommitter
from .complementarity import Candidate, complement, opportunities
from .config import HubConfig
from .connection import Connection
from .errors import HubError, failed_precondition, invalid, not_found, permission_denied
from .ratelimit import TokenBucket
from .router import Router
from .store import HubStore
from .validation import validate, validate_batch, validate_hello

log = logging.getLogger(__name__)

# grpc.aio.ServicerContext; grpcio ships no type hints, so grpc types are Any to mypy.
Context: TypeAlias = Any


# share message kind -> (artifact kind, the field holding the content in both messages)
_SHARES = {
    "share_pattern": (pb.ARTIFACT_KIND_PATTERN, "pattern"),
    "share_code_component": (pb.ARTIFACT_KIND_CODE_COMPONENT, "code_component"),
    "share_os_component": (pb.ARTIFACT_KIND_OS_COMPONENT, "os_component"),
}


# Agents listed in a training sync, in all and per specialization (for opportunities).
ROSTER_SIZE = 32


@dataclass
class Roster:
    active: list[pb.AgentInfo] = field(default_factory=list)
    active_bytes: int = 0  # of `active`, as entries of a TrainingSync
    by_specialization: dict[int, list[Candidate]] = field(default_factory=dict)


@dataclass(frozen=True)
class KnowledgeBase:
    """The summary a sync round sends, with each recent artifact's size (measured once)."""

    summary: pb.KnowledgeBaseSummary
    sizes: list[int]


def to_command(agent_id: str, request: pb.ConnectRequest, kind: str) -> cmd.Command:
    """The state change a validated message asks for, with its body's fingerprint (the kind
    and the body, not the message_id), which travels with it to the writer."""
    command = _command(agent_id, request, kind)
    body = getattr(request, kind).SerializeToString(deterministic=True)
    command.fingerprint = hashlib.blake2b(kind.encode() + b"\0" + body, digest_size=16).digest()
    return command


def _command(agent_id: str, request: pb.ConnectRequest, kind: str) -> cmd.Command:
    mid = request.message_id
    if kind in _SHARES:
        artifact_kind, content = _SHARES[kind]
        artifact = pb.Artifact(kind=artifact_kind)
        getattr(artifact, content).CopyFrom(getattr(getattr(request, kind), content))
        return cmd.ShareArtifact(agent_id, mid, artifact)
    if kind == "request_feature":
        return cmd.RequestFeature(agent_id, mid, request.request_feature)
    if kind == "deliver_feature":
        return cmd.DeliverFeature(agent_id, mid, request.deliver_feature)
    if kind == "propose_collaboration":
        return cmd.ProposeCollaboration(agent_id, mid, request.propose_collaboration)
    if kind == "accept_collaboration":
        return cmd.CollaborationStep(
            agent_id, mid, request.accept_collaboration.session_id, Step.ACCEPT
        )
    if kind == "decline_collaboration":
        body = request.decline_collaboration
        return cmd.CollaborationStep(agent_id, mid, body.session_id, Step.DECLINE, note=body.reason)
    if kind == "report_collaboration_progress":
        report = request.report_collaboration_progress
        return cmd.CollaborationStep(
            agent_id,
            mid,
            report.session_id,
            Step.PROGRESS,
            progress=report.progress,
            note=report.note,
        )
    if kind == "complete_collaboration":
        done = request.complete_collaboration
        return cmd.CollaborationStep(
            agent_id, mid, done.session_id, Step.COMPLETE, component=done.component
        )
    raise failed_precondition(f"unsupported message kind {kind}")  # validate() knows every kind


Query = TypeVar("Query")
Answer = TypeVar("Answer")


def _rich_errors(
    method: Callable[[HubServicer, Query, Context], Awaitable[Answer]],
) -> Callable[[HubServicer, Query, Context], Awaitable[Answer]]:
    """Answer a HubError with a rich status (BadRequest details that grpcurl prints)."""

    @functools.wraps(method)
    async def wrapper(self: HubServicer, request: Query, context: Context) -> Answer:
        try:
            return await method(self, request, context)
        except HubError as error:
            await context.abort_with_status(error.to_status())
            raise  # abort_with_status raises; this keeps type checkers informed

    return wrapper


class HubServicer(hub_pb2_grpc.HubServiceServicer):
    def __init__(
        self, config: HubConfig, store: HubStore, committer: GroupCommitter, router: Router
    ) -> None:
        self._config = config
        self._store = store
        self._committer = committer
        self._router = router
        self._draining = False
        self._teardowns: set[asyncio.Task[None]] = set()  # referenced until done
        # Per agent, so reconnecting does not refill the bucket; one small object per agent.
        self._buckets: dict[str, TokenBucket] = {}
        # What the items of one response may take: every response is built to fit.
        self._budget = paging.budget(config.max_message_bytes)

    # --- the stream -----------------------------------------------------------

    async def Connect(  # type: ignore[override]  # answers through context.write
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> None:
        agent_id = current_agent()
        if self._draining:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the hub is shutting down; retry shortly"
            )
        hello = await self._expect_hello(agent_id, request_iterator, context)
        limit = self._config.max_connections
        if len(self._router) >= limit and not self._router.is_connected(agent_id):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the hub carries at most {limit} live connections; retry later",
            )
        connection = Connection(
            hello,
            token_hash=current_token_hash(),
            store=self._store,
            router=self._router,
            max_inflight=self._config.max_inflight_per_stream,
            queue_size=self._config.outbound_queue_size,
            events_per_response=self._config.max_events_per_response,
            replay_page_size=self._config.replay_page_size,
            max_bytes=self._budget,
            linger=self._config.stream_linger,
        )
        if hello.skip_history:
            connection.cursor = max(connection.cursor, self._router.last_published_seq)
        start = connection.cursor  # with skip_history, nothing at or below this is sent
        superseded = self._router.attach(connection)
        if superseded is not None:
            superseded.end(
                grpc.StatusCode.ABORTED, "superseded by a newer connection for this agent"
            )
        log.info("%s connected (resume after seq %d)", agent_id, hello.resume_after_seq)
        sender: asyncio.Task[None] | None = None
        reader: asyncio.Task[None] | None = None
        try:
            await self._committer.submit(cmd.AgentOnline(agent_id, hello))
            welcome = pb.Welcome(
                agent_id=agent_id,
                head_seq=start if hello.skip_history else self._router.last_published_seq,
                training_sync_interval_seconds=self._config.training_sync_interval,
                hub_version=__version__,
                max_batch_requests=self._config.limits.max_batch_requests,
            )
            connection.send_sync(await self.training_sync(connection))
            sender = asyncio.create_task(connection.run_sender(welcome, context.write))
            reader = asyncio.create_task(self._read(connection, request_iterator))
            ended = asyncio.create_task(connection.ended.wait())
            try:
                done, _ = await asyncio.wait(
                    [sender, reader, ended], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                ended.cancel()
            for task in done:
                if task is not ended and (exc := task.exception()) is not None:
                    raise exc
        except HubError as error:
            connection.end(error.code, error.message)
        finally:
            # Its own task: a client that cancels the RPC cancels this handler, and
            # teardown must still detach the connection and mark the agent offline.
            teardown = asyncio.create_task(self._teardown(connection, reader, sender))
            self._teardowns.add(teardown)
            teardown.add_done_callback(self._teardowns.discard)
            await asyncio.shield(teardown)
        if connection.end_status is not None:
            await context.abort(*connection.end_status)

    async def _teardown(
        self,
        connection: Connection,
        reader: asyncio.Task[None] | None,
        sender: asyncio.Task[None] | None,
    ) -> None:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if sender is not None:
            await self._stop_sender(connection, sender)
        if self._router.detach(connection):
            with contextlib.suppress(HubError, TimeoutError):
                await asyncio.wait_for(
                    self._committer.submit(cmd.AgentOffline(connection.agent_id)),
                    self._config.shutdown_grace,
                )
        log.info("%s disconnected", connection.agent_id)

    @staticmethod
    async def _stop_sender(connection: Connection, sender: asyncio.Task[None]) -> None:
        """Let the sender finish the write it is in before the stream's status goes out.

        Cancelling it inside `context.write` leaves grpc unable to send the final
        status, and the trainer waits for it forever; so ask it to stop, and cancel
        only a sender stuck behind a peer that does not read.
        """
        connection.stop_sending()
        done, _ = await asyncio.wait([sender], timeout=1.0)
        if not done:
            sender.cancel()
        # Whatever ended it (a write to a peer that vanished raises), teardown goes on.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender

    async def _expect_hello(
        self, agent_id: str, requests: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> pb.Hello:
        try:
            first = await asyncio.wait_for(anext(requests), self._config.hello_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no Hello within {self._config.hello_timeout:g}s of opening the stream",
            )
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "stream closed before Hello")
        except DecodeError as exc:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message is not a ConnectRequest ({exc})",
            )
        first.DiscardUnknownFields()  # as _read does
        if first.WhichOneof("body") != "hello":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message must be hello, got {first.WhichOneof('body') or 'an empty body'}",
            )
        try:
            validate_hello(first, self._config.limits)
            if first.hello.agent_id != agent_id:
                raise permission_denied(
                    f"this token belongs to {agent_id}; it cannot say hello as {first.hello.agent_id}"
                )
        except HubError as error:
            await context.abort(error.code, error.message)
        return first.hello

    async def _read(
        self, connection: Connection, requests: AsyncIterator[pb.ConnectRequest]
    ) -> None:
        """Take one message at a time; the next is read only once this one is queued."""
        agent_id = connection.agent_id
        bucket = self._buckets.get(agent_id)
        if bucket is None and self._config.rate_limit_per_second > 0:
            bucket = self._buckets[agent_id] = TokenBucket(
                self._config.rate_limit_per_second, self._config.rate_limit_burst
            )
        try:
            async for request in requests:
                # The boundary: fields the contract does not define (at any depth: nested,
                # batched, map entries) would skip every limit and be stored and routed.
                request.DiscardUnknownFields()
                if request.WhichOneof("body") == "batch":
                    await self._take_batch(connection, bucket, request)
                else:
                    await self._take(connection, bucket, request)
                if self._draining:
                    break
        except DecodeError as exc:
            # The peer sent bytes that are not a ConnectRequest: answer what was
            # readable, then end the stream with a status that says so.
            await connection.wait_all_answered(self._config.shutdown_grace)
            connection.end(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a message on the stream is not a valid ConnectRequest ({exc}); stream ended",
            )
            return
        # The trainer finished sending: answer what it sent, then end the stream.
        await connection.wait_all_answered(self._config.shutdown_grace)

    async def _take_batch(
        self, connection: Connection, bucket: TokenBucket | None, batch: pb.ConnectRequest
    ) -> None:
        """Each request of a batch as if it had come alone; or one error for the batch."""
        try:
            validate_batch(batch, self._config.limits)
        except HubError as error:
            await connection.admit()
            connection.answer(batch.message_id, error)
            return
        for request in batch.batch.requests:
            await self._take(connection, bucket, request)

    async def _take(
        self, connection: Connection, bucket: TokenBucket | None, request: pb.ConnectRequest
    ) -> None:
        """Validate one message and queue it for commit (or answer its error)."""
        await connection.admit()
        try:
            if bucket is not None and not bucket.take():
                raise HubError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit: at most {bucket.rate:g} messages/s (bursts of "
                    f"{bucket.burst:g}); resend this message_id later",
                )
            kind = validate(request, self._config.limits)
            await self._committer.enqueue(
                to_command(connection.agent_id, request, kind),
                partial(connection.answer, request.message_id),
                request.ByteSize(),
            )
        except HubError as error:
            connection.answer(request.message_id, error)

    # --- training sync ----------------------------------------------------------

    def _roster(self) -> Roster:
        """Who is online, sampled once per sync round: at most ROSTER_SIZE agents in all and
        per specialization, so a round costs O(connections), not O(connections^2); and at
        most half a response of them, so the knowledge base has room beside them."""
        roster = Roster()
        for c in self._router.connections():
            spec = c.hello.specialization
            if len(roster.active) < ROSTER_SIZE:
                info = pb.AgentInfo(
                    agent_id=c.agent_id,
                    specialization=spec,
                    capabilities=c.hello.capabilities,
                    version=c.hello.version,
                    online=True,
                )
                if roster.active_bytes + paging.entry_bytes(info) <= self._budget // 2:
                    roster.active.append(info)
                    roster.active_bytes += paging.entry_bytes(info)
            peers = roster.by_specialization.setdefault(spec, [])
            if len(peers) < ROSTER_SIZE:
                peers.append(Candidate(c.agent_id, spec))
        return roster

    async def _knowledge_base(self) -> KnowledgeBase:
        summary = await self._store.knowledge_base(recent=5)
        return KnowledgeBase(summary, [paging.entry_bytes(a) for a in summary.recent_artifacts])

    async def training_sync(
        self,
        connection: Connection,
        knowledge_base: KnowledgeBase | None = None,
        roster: Roster | None = None,
    ) -> pb.TrainingSync:
        """What `connection`'s agent should know: who is active, whom to pair with, the KB;
        in one response's budget, with as many of the newest artifacts as fit."""
        kb = knowledge_base or await self._knowledge_base()
        roster = roster or self._roster()
        me, my_spec = connection.agent_id, connection.hello.specialization
        candidates = [
            c
            for spec, peers in roster.by_specialization.items()
            if complement(my_spec, spec) is not None
            for c in peers
        ]
        sync = pb.TrainingSync(
            active_agents=[a for a in roster.active if a.agent_id != me],
            opportunities=opportunities(me, my_spec, candidates),
        )
        sync.create_time.GetCurrentTime()
        # 64: the create time, the counts and the tags around them.
        room = (
            self._budget
            - roster.active_bytes
            - sum(paging.entry_bytes(o) for o in sync.opportunities)
            - 64
        )
        if sum(kb.sizes) <= room:
            sync.knowledge_base.CopyFrom(kb.summary)
            return sync
        summary = sync.knowledge_base
        for name in ("pattern", "code_component", "os_component", "feature_request"):
            setattr(summary, f"{name}_count", getattr(kb.summary, f"{name}_count"))
        for artifact, size in zip(kb.summary.recent_artifacts, kb.sizes, strict=True):
            if size <= room:  # an artifact too large is left out, not the ones after it
                room -= size
                summary.recent_artifacts.append(artifact)
        return sync

    async def broadcast_training_sync(self) -> None:
        knowledge_base = await self._knowledge_base()
        roster = self._roster()
        for i, connection in enumerate(self._router.connections()):
            connection.send_sync(await self.training_sync(connection, knowledge_base, roster))
            if i % 100 == 99:
                await asyncio.sleep(0)  # let streams run between chunks of a big round

    # --- shutdown ---------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Stop reading, commit and answer what was read, then end every stream."""
        self._draining = True
        await self._committer.stop(timeout)
        connections = list(self._router.connections())
        await asyncio.gather(*(c.wait_all_answered(timeout) for c in connections))
        for connection in connections:
            connection.end(
                grpc.StatusCode.UNAVAILABLE, "the hub is shutting down; reconnect shortly"
            )

    # --- queries ----------------------------------------------------------------

    @_rich_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        limit = paging.page_size(request.page_size)
        cursor = paging.decode_int(request.page_token)
        page = await self._store.list_agents(
            request.online_only, limit, str(cursor or ""), self._budget
        )
        return pb.ListAgentsResponse(agents=page.items, next_page_token=_token(page.next_cursor))

    @_rich_errors
    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: Context
    ) -> pb.ListArtifactsResponse:
        _check_enum("kind", request.kind, pb.ArtifactKind)
        _check_enum("specialization", request.specialization, pb.Specialization)
        limit = paging.page_size(request.page_size)
        cursor = paging.decode_int(request.page_token)
        page = await self._store.list_artifacts(
            request.kind,
            request.specialization,
            request.contributor_id,
            limit,
            str(cursor or ""),
            self._budget,
        )
        return pb.ListArtifactsResponse(
            artifacts=page.items, next_page_token=_token(page.next_cursor)
        )

    @_rich_errors
    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Context
    ) -> pb.GetArtifactResponse:
        if not request.artifact_id:
            raise invalid([("artifact_id", "is required")])
        artifact = await self._store.get_artifact(request.artifact_id)
        if artifact is None:
            raise not_found(f"artifact {request.artifact_id}")
        if (size := artifact.ByteSize()) > self._budget:
            raise paging.too_large(f"artifact {request.artifact_id}", size, self._budget)
        return pb.GetArtifactResponse(artifact=artifact)

    @_rich_errors
    async def ListCollaborations(
        self, request: pb.ListCollaborationsRequest, context: Context
    ) -> pb.ListCollaborationsResponse:
        _check_enum("state", request.state, pb.CollaborationState)
        limit = paging.page_size(request.page_size)
        page = await self._store.list_collaborations(
            request.agent_id, request.state, limit, paging.decode(request.page_token), self._budget
        )
        return pb.ListCollaborationsResponse(
            collaborations=page.items, next_page_token=_token(page.next_cursor)
        )

    @_rich_errors
    async def ListFeatureRequests(
        self, request: pb.ListFeatureRequestsRequest, context: Context
    ) -> pb.ListFeatureRequestsResponse:
        limit = paging.page_size(request.page_size)
        cursor = paging.decode_int(request.page_token)
        page = await self._store.list_feature_requests(
            request.requester_id, limit, str(cursor or ""), self._budget
        )
        return pb.ListFeatureRequestsResponse(
            feature_requests=page.items, next_page_token=_token(page.next_cursor)
        )

    @_rich_errors
    async def GetHubStats(
        self, request: pb.GetHubStatsRequest, context: Context
    ) -> pb.GetHubStatsResponse:
        stats = await self._store.stats()
        stats.agents_online = len(self._router)
        stats.hub_version = __version__
        return stats


def _token(cursor: str) -> str:
    return paging.encode(cursor) if cursor else ""


def _check_enum(field: str, value: int, enum_type: Any) -> None:
    if value not in enum_type.DESCRIPTOR.values_by_number:
        raise invalid([(field, f"{value} is not a known {enum_type.DESCRIPTOR.name}")])

"""The Connect session: Hello, admission, the reader and the sender of one stream, its
teardown, and the drain that ends every stream at shutdown.

The data path of a trainer message reads top to bottom: stream in -> validate -> persist
(group commit) -> route (router) -> stream out (the connection's sender).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from generated.kernelhub.v1 import hub_pb2 as pb

from . import __version__
from . import commands as cmd
from .auth import current_agent, current_token_hash
from .committer import GroupCommitter
from .config import HubConfig
from .connection import STOP_SENDER_SECONDS, Connection, stop_sender
from .errors import StatusError, permission_denied
from .lingers import Linger
from .messages import to_command
from .metrics import HubMetrics
from .outcomes import Outcome
from .ratelimit import BucketTable, TokenBucket
from .retention import Retention
from .router import Router
from .state import HubStore
from .subscriptions import Filter
from .training_sync import TrainingSyncs
from .validation import validate, validate_batch, validate_hello

log = logging.getLogger(__name__)

# grpc.aio.ServicerContext; grpcio ships no type hints, so grpc types are Any to mypy.
Context: TypeAlias = Any

# The trailing metadata of an OUT_OF_RANGE Hello refusal: the oldest seq still held.
OLDEST_SEQ_KEY = "kernelhub-oldest-seq"
SHUTTING_DOWN = "the hub is shutting down; reconnect shortly"
# Seconds a stopping hub still gives each stream to get its answers out, however much of
# the grace the last commits took.
END_FLOOR = 1.0
# A disconnect's AgentOffline that failed is tried again this many times, the first after
# this many seconds, each wait twice the last (1 + 2 + 4 + 8 s: a database restart).
OFFLINE_RETRIES = 4
OFFLINE_BACKOFF = 1.0


class Sessions:
    """Every live Connect stream of this hub, from Hello to teardown."""

    def __init__(
        self,
        config: HubConfig,
        store: HubStore,
        committer: GroupCommitter,
        router: Router,
        syncs: TrainingSyncs,
        retention: Retention,
        budget: int,
        metrics: HubMetrics,
        stream_linger: Linger,
    ) -> None:
        self._config = config
        self._linger = stream_linger  # every stream's (lingers.py)
        self._metrics = metrics
        self._received = metrics.received  # children resolved once, by (kind, outcome)
        self._errors = metrics.errors
        self._limited = metrics.rate_limited
        self._ended = metrics.streams_ended
        self._retention = retention
        self._store = store
        self._committer = committer
        self._router = router
        self._syncs = syncs
        self._budget = budget  # what one response may carry
        self._draining = False
        self._teardowns: set[asyncio.Task[None]] = set()  # referenced until done
        self._retries: set[asyncio.Task[None]] = set()  # failed AgentOfflines, tried again
        # Per agent, so reconnecting does not refill a bucket; a bounded table, so memory
        # does not grow with every agent id ever seen.
        agents = 2 * config.max_connections
        self._buckets = _table(config.rate_limit_per_second, config.rate_limit_burst, agents)
        self._connects = _table(config.connect_rate_per_second, config.connect_burst, agents)

    async def serve(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> None:
        """One Connect call, from Hello until the stream ends."""
        agent_id = current_agent()
        if self._draining:
            await self._abort(
                context, grpc.StatusCode.UNAVAILABLE, "the hub is shutting down; retry shortly"
            )
        hello = await self._expect_hello(agent_id, request_iterator, context)
        await self._admit(agent_id, context)
        # From this check to the attach: one loop turn (retention.py says why).
        oldest = self._retention.oldest_seq
        refusal = self._retention.refusal("resume_after_seq", hello.resume_after_seq)
        if not hello.skip_history and refusal is not None:
            self._ended[grpc.StatusCode.OUT_OF_RANGE].inc()
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                refusal,
                trailing_metadata=((OLDEST_SEQ_KEY, str(oldest)),),
            )
        connection = Connection(
            hello,
            token_hash=current_token_hash(),
            store=self._store,
            max_inflight=self._config.max_inflight_per_stream,
            queue_size=self._config.outbound_queue_size,
            events_per_response=self._config.max_events_per_response,
            replay_page_size=self._config.replay_page_size,
            replay_scan_seqs=self._config.replay_scan_seqs,
            max_bytes=self._budget,
            linger=self._linger,
            metrics=self._metrics,
            wires=self._router.wires,
            head=lambda: self._router.last_published_seq,
        )
        # With skip_history, nothing at or below `start` is sent.
        start = connection.start_at(hello.skip_history, self._router.last_published_seq, oldest)
        superseded = self._router.attach(connection)
        if superseded is not None:
            superseded.end(
                grpc.StatusCode.ABORTED, "superseded by a newer connection for this agent"
            )
        log.info("%s connected (resume after seq %d)", agent_id, hello.resume_after_seq)
        sender: asyncio.Task[None] | None = None
        reader: asyncio.Task[None] | None = None
        try:
            online = await self._committer.submit(cmd.AgentOnline(agent_id, hello))
            if online.agent is not None:
                connection.connected_time = online.agent.last_seen_time
                connection.presence_rev = online.presence_rev
                self._router.came_online(connection, online.agent)
            welcome = pb.Welcome(
                agent_id=agent_id,
                head_seq=start if hello.skip_history else self._router.last_published_seq,
                training_sync_interval_seconds=self._config.training_sync_interval,
                hub_version=__version__,
                max_batch_requests=self._config.limits.max_batch_requests,
                oldest_seq=self._retention.oldest_seq,
                roster_size=connection.roster_size,
            )
            connection.send_sync(await self._syncs.compose(connection))
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
        except StatusError as error:
            connection.end(error.code, error.message)
        finally:
            # Its own task: a client that cancels the RPC cancels this handler, and
            # teardown must still detach the connection and mark the agent offline.
            teardown = asyncio.create_task(self._teardown(connection, reader, sender))
            self._teardowns.add(teardown)
            teardown.add_done_callback(self._teardowns.discard)
            await asyncio.shield(teardown)
        if connection.end_status is not None:
            await self._abort(context, *connection.end_status)
        self._ended[grpc.StatusCode.OK].inc()  # the trainer half-closed: answered, then OK

    async def _abort(self, context: Context, code: grpc.StatusCode, message: str) -> NoReturn:
        """End the call with `code`, counted (kernelhub_streams_ended_total)."""
        self._ended[code].inc()
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # it raises; this tells the checkers

    async def _admit(self, agent_id: str, context: Context) -> None:
        """Refuse a connect over the agent's connect rate or the hub's connection limit.

        After Hello (so the trainer's write of it cannot race the status) and before
        AgentOnline: a refused reconnect makes no presence event for anyone."""
        if self._connects is not None and not (bucket := self._connects.get(agent_id)).take():
            self._limited["connects"].inc()
            await self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many connects for {agent_id}: at most {bucket.rate:g}/s (bursts of "
                f"{bucket.burst:g}); retry in {bucket.wait():.1f} s",
            )
        limit = self._config.max_connections
        if len(self._router) >= limit and not self._router.is_connected(agent_id):
            self._limited["connections"].inc()
            await self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the hub carries at most {limit} live connections; retry later",
            )

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
            await stop_sender(connection, sender)
        superseded = connection.end_status is not None and (
            connection.end_status[0] == grpc.StatusCode.ABORTED
        )
        # Detached here but superseded (by a stream on another replica): gone from this
        # replica's presence, but online there, so no AgentOffline.
        detached = self._router.detach(connection)
        if detached:
            self._router.went_offline(connection.agent_id)
        failed = detached and not superseded and not await self._went_offline(connection)
        if failed and not self._draining:
            # Else the agent would stay online hub-wide while this replica lives.
            retry = asyncio.create_task(
                self._retry_offline(connection), name=f"offline-{connection.agent_id}"
            )
            self._retries.add(retry)
            retry.add_done_callback(self._retries.discard)
        log.info("%s disconnected", connection.agent_id)

    async def _went_offline(self, connection: Connection) -> bool:
        """AgentOffline for the ended stream (no-op if the agent connected again since);
        False if it failed (the database down or too slow)."""
        try:
            await asyncio.wait_for(
                self._committer.submit(
                    cmd.AgentOffline(connection.agent_id, rev=connection.presence_rev)
                ),
                self._config.shutdown_grace,
            )
        except (StatusError, TimeoutError):
            return False
        return True

    async def _retry_offline(self, connection: Connection) -> None:
        """A failed AgentOffline, tried again a few times with backoff while no newer stream
        for the agent is here (its own AgentOnline says where the agent is then) and the hub
        is not stopping (its released lease has the leader mark the agent offline)."""
        for attempt in range(OFFLINE_RETRIES):
            await asyncio.sleep(OFFLINE_BACKOFF * 2**attempt)
            if self._draining or self._router.connection(connection.agent_id) is not None:
                return
            if await self._went_offline(connection):
                return
        log.warning(
            "%s: cannot mark it offline (%d tries); it stays online until this hub stops",
            connection.agent_id,
            OFFLINE_RETRIES + 1,
        )

    async def _expect_hello(
        self, agent_id: str, requests: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> pb.Hello:
        try:
            first = await asyncio.wait_for(anext(requests), self._config.hello_timeout)
        except TimeoutError:
            await self._abort(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no Hello within {self._config.hello_timeout:g}s of opening the stream",
            )
        except StopAsyncIteration:
            await self._abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, "stream closed before Hello"
            )
        except DecodeError as exc:
            await self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message is not a ConnectRequest ({exc})",
            )
        first.DiscardUnknownFields()  # as _read does
        if first.WhichOneof("body") != "hello":
            await self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message must be hello, got {first.WhichOneof('body') or 'an empty body'}",
            )
        try:
            validate_hello(first, self._config.limits)
            if first.hello.agent_id != agent_id:
                raise permission_denied(
                    f"this token belongs to {agent_id}; it cannot say hello as {first.hello.agent_id}"
                )
        except StatusError as error:
            await self._abort(context, error.code, error.message)
        return first.hello

    async def _read(
        self, connection: Connection, requests: AsyncIterator[pb.ConnectRequest]
    ) -> None:
        """Take one message at a time; the next is read only once this one is queued."""
        bucket = None if self._buckets is None else self._buckets.get(connection.agent_id)
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
                    # The hub stops reading, not the trainer: answer what was read, then
                    # end with the status a stop promises. Returning without it would end
                    # the call with OK, which tells the trainer it half-closed.
                    await connection.wait_all_answered(self._config.shutdown_grace)
                    connection.end(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                    return
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
        except StatusError as error:
            await connection.admit()
            # A refused batch costs a message of the rate too (a valid one costs its requests).
            limited = self._rate_limited(bucket)
            self._answer(connection, batch.message_id, "batch", limited or error)
            return
        for request in batch.batch.requests:
            await self._take(connection, bucket, request)

    async def _take(
        self, connection: Connection, bucket: TokenBucket | None, request: pb.ConnectRequest
    ) -> None:
        """Validate one message and queue it for commit (or answer its error)."""
        await connection.admit()
        body = request.WhichOneof("body") or "none"
        try:
            if (limited := self._rate_limited(bucket)) is not None:
                raise limited
            kind = validate(request, self._config.limits)
            if kind == "subscribe":
                # Not stored: the stream's own state, switched at a seq the receipt names.
                subscription = Filter.of(request.subscribe.subscription)
                at = self._router.resubscribe(connection, subscription)
                connection.answer(request.message_id, Outcome(seq=at))
                return
            await self._committer.enqueue(
                to_command(connection.agent_id, request, kind),
                partial(self._answer, connection, request.message_id, body),
                request.ByteSize(),
            )
        except StatusError as error:
            self._answer(connection, request.message_id, body, error)

    def _answer(
        self,
        connection: Connection,
        message_id: str,
        kind: str,
        result: Outcome | BaseException,
    ) -> None:
        """Count one message's answer (kernelhub_messages_received_total), then queue it."""
        if isinstance(result, Outcome):
            outcome = "duplicate" if result.duplicate else "committed"
        else:
            outcome = "refused"
            code = result.code if isinstance(result, StatusError) else grpc.StatusCode.INTERNAL
            self._errors[code].inc()
        self._received[(kind, outcome)].inc()
        connection.answer(message_id, result)

    def _rate_limited(self, bucket: TokenBucket | None) -> StatusError | None:
        """Takes one message's token from `bucket`; the refusal if there is none left."""
        if bucket is None or bucket.take():
            return None
        self._limited["messages"].inc()
        return StatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"rate limit: at most {bucket.rate:g} messages/s (bursts of {bucket.burst:g}); "
            "resend this message_id later",
        )

    async def drain(self, timeout: float) -> None:
        """Stop reading, commit and answer what was read, then end every stream.

        Each stream ends as soon as its own answers are out (or `timeout` has passed), so a
        trainer that does not read holds only its own stream, not everyone's."""
        clock = asyncio.get_running_loop()
        deadline = clock.time() + timeout
        self._draining = True
        for retry in self._retries:  # the stopping hub's leases say it now (or its restart)
            retry.cancel()
        await self._committer.stop(timeout)

        async def finish(connection: Connection) -> None:
            # What the commits left of the grace, but never nothing: answers queued by a
            # slow last commit still get their moment before the stream's status.
            await connection.wait_all_answered(max(END_FLOOR, deadline - clock.time()))
            connection.end(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        await asyncio.gather(*(finish(c) for c in self._router.connections()))

    async def settle(self) -> None:
        """Wait for the streams' teardowns still under way once the server has stopped (each
        at most as long as it waits for its sender): each collects its sender's end, which
        the loop's close would otherwise cancel mid-way and leave unretrieved (a write into
        the stopped server raises)."""
        if self._teardowns:
            await asyncio.wait(set(self._teardowns), timeout=STOP_SENDER_SECONDS + END_FLOOR)


def _table(rate: float, burst: float, agents: int) -> BucketTable | None:
    """A rate limit's buckets, or None when the rate is 0 (disabled)."""
    return BucketTable(rate, burst, agents) if rate > 0 else None

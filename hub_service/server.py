"""The hub process: the gRPC server with auth, health and reflection, and its background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from . import commands as cmd
from . import heap
from .auth import BearerAuthInterceptor
from .committer import GroupCommitter
from .config import HubConfig
from .errors import StatusError
from .leases import Leases
from .lingers import Linger, LoadFollower
from .metrics import HubMetrics, MetricsEndpoint
from .outcomes import Outcome
from .presence import Presence
from .replica import LogFollower
from .retention import Retention, RetentionPolicy
from .roles import Role
from .router import Router
from .servicer import HubServicer
from .session import END_FLOOR
from .settings import mask_url
from .sql_store import SqlStore
from .state import HubStore, IssuedToken
from .store_factory import make_store

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HubService"].full_name
LEASE_LOST = (
    "this hub replica lost its lease on the database (it was paused or cut off for longer "
    "than replica_lease); reconnect and resume"
)


class HubServer:
    """A running hub. `start()` binds and serves; `stop()` drains and shuts down cleanly."""

    def __init__(self, config: HubConfig, store: HubStore | None = None) -> None:
        self.config = config
        self.store = store or make_store(config.database_url, config)
        # A stream's linger follows the process's CPU; the commit's also the time spent
        # committing (the writer's work, in its own process).
        stream_linger = Linger("stream", config.stream_linger)
        # Presence's pause follows the stream linger's load factor (if it follows the load).
        self.router = Router(
            Presence(
                config.presence_linger,
                config.presence_writes_per_second,
                busy=(lambda: stream_linger.factor) if config.lingers_follow_load else lambda: 0.0,
            )
        )
        commit_linger = Linger(
            "commit",
            config.commit_linger,
            (time.process_time, lambda: self.committer.busy_seconds),
        )
        self.metrics = HubMetrics()
        # Replica mode: the shared log feeds the router (and the validators); else each
        # commit's outcome does. The leases say who runs the hub-wide jobs.
        shared = self.store.shared if isinstance(self.store, SqlStore) and config.replica else None
        self.leases = (
            Leases(
                self.store,
                shared.origin,
                config.replica_lease,
                prunable=lambda: self.retention.oldest_seq - 1,
                on_lost=self._lease_lost,
                on_expired=self._end_streams,
            )
            if shared is not None and isinstance(self.store, SqlStore)
            else None
        )
        self.follower: LogFollower | None = None
        # When the leader next looks for agents online on no replica at all (loop time).
        self._orphans_due = 0.0
        self.committer = GroupCommitter(
            self.store,
            self._publish,
            on_failure=self.router.resync,
            on_health=self._commit_answered,
            batch_size=config.commit_batch_size,
            batch_bytes=config.commit_batch_bytes,
            depth=config.commit_pipeline_depth,
            queue_size=config.commit_queue_size,
            linger=commit_linger,
            metrics=self.metrics,
        )
        self.retention = Retention(
            self.store,
            self.router,
            RetentionPolicy.of(config),
            self.leases.is_leader if self.leases is not None else None,
        )
        self.servicer = HubServicer(
            config,
            self.store,
            self.committer,
            self.router,
            self.metrics,
            self.retention,
            stream_linger,
        )
        self.metrics.observe_state(
            lambda: len(self.router),
            self.committer.queued,
            lambda: self.router.last_published_seq,
            self.servicer.verdicts.waiting,
        )
        if self.leases is not None and isinstance(self.store, SqlStore):
            self.follower = LogFollower(
                self.store,
                self.router,
                interval=config.replica_catch_up_interval,
                page_size=config.replay_page_size,
                max_bytes=config.max_message_bytes,
                # Every replica's components wake the validators waiting here.
                routed=self.servicer.verdicts.notice,
                holds=self.leases.holds,
                on_gap=self._log_gap,
            )
        self.lingers: LoadFollower | None = None
        if config.lingers_follow_load:
            self.lingers = LoadFollower(
                [stream_linger, commit_linger], on_factor=self.metrics.linger_set
            )
        else:
            for linger in (stream_linger, commit_linger):
                self.metrics.linger_set(linger)
        self.health = health.aio.HealthServicer()
        # Whether the last commit reached the database (through the writer): health says so.
        self._database_up = True
        self._health_changed = asyncio.Event()
        self.port = 0
        self.metrics_endpoint: MetricsEndpoint | None = None  # serving /metrics, if configured
        self._server: grpc.aio.Server | None = None
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        try:
            await self.store.open()
            return await self._start_serving()
        except BaseException:
            # A port in use, a bad certificate, a database that is down or on a full disk:
            # release what was started (the writer process and the committer), or the
            # process could not exit.
            await self.committer.stop(0)
            await self._stop_metrics()
            if self.follower is not None:
                await self.follower.stop()
            if self.leases is not None:
                await self.leases.stop()
            if self._server is not None:
                await self._server.stop(None)
                self._server = None
            await self.store.close()
            raise

    def _publish(self, outcome: Outcome, answer: Callable[[], None]) -> None:
        """A committed outcome: its new components to the validators waiting here, its
        events to the router, then its answer (in replica mode, both through the shared
        log's order)."""
        if self.follower is not None:
            self.follower.committed(outcome, answer)
            return
        self.servicer.verdicts.notice(outcome)
        self.router.publish(outcome)
        answer()

    async def _start_serving(self) -> int:
        self.committer.start()
        if self.follower is None or self.leases is None:
            await self.committer.submit(cmd.ResetPresence())
            self.router.last_published_seq = await self.store.head_seq()
            await self.retention.load()
        else:
            # Not ResetPresence: the agents online on the other replicas still are (those of
            # a replica that died are the leader's to mark offline, when its lease expires).
            self.retention.oldest_seq = await self.leases.register()
            await self.follower.start(await self.store.head_seq())
            await self.leases.renew()  # and lead, if nobody does
            self.leases.start()
        self._server = grpc.aio.server(
            interceptors=[BearerAuthInterceptor(self.store.authenticate, self.metrics.rpc_error)],
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.keepalive_time_ms", int(self.config.keepalive_time * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.config.keepalive_timeout * 1000)),
                # Since gRPC 1.5x a ping's ack deadline is this option (default 60 s), not
                # the keepalive timeout: without it a frozen peer is noticed only after a minute.
                ("grpc.http2.ping_timeout_ms", int(self.config.keepalive_timeout * 1000)),
                ("grpc.http2.max_pings_without_data", 0),
                (
                    "grpc.http2.min_ping_interval_without_data_ms",
                    int(self.config.min_client_ping_interval * 1000),
                ),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.server_handshake_timeout_ms", int(self.config.handshake_timeout * 1000)),
                # gRPC core queues streams the event loop has not accepted yet, and past 1,000
                # (hard limit 3,000) refuses them with a bare CANCELLED: a connect storm of a
                # few thousand trainers lost a third of them. The hub's own bound is
                # `max_connections`; let the queue hold that many (never fewer than gRPC's
                # own defaults, which unary calls share).
                ("grpc.server.max_pending_requests", max(1000, self.config.max_connections)),
                (
                    "grpc.server.max_pending_requests_hard_limit",
                    max(3000, self.config.max_connections),
                ),
                # A second hub on the same port must fail to bind, not share the port; the
                # workers of one `serve --workers N` share theirs (workers.py).
                ("grpc.so_reuseport", 1 if self.config.workers > 1 else 0),
            ],
        )
        hub_pb2_grpc.add_HubServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        await self._server.start()
        if self.config.metrics_port is not None:
            self.metrics_endpoint = MetricsEndpoint(
                self.metrics, self.config.host, self.config.metrics_port
            )
            self.metrics_endpoint.start()
        await self._set_health(serving=True)
        self._loops = [
            asyncio.create_task(self._follow_database()),
            asyncio.create_task(self._every(self.config.reaper_interval, self._expire_due)),
            asyncio.create_task(
                self._every(self.config.token_recheck_interval, self._end_revoked_streams)
            ),
            asyncio.create_task(self._every(self.config.retention_interval, self.retention.run)),
        ]
        if self.lingers is not None:
            self._loops.append(asyncio.create_task(self.lingers.run()))
        self._loops.append(asyncio.create_task(heap.Trimmer().run()))
        if self.config.training_sync_interval > 0:
            self._loops.append(
                asyncio.create_task(
                    self._every(
                        self.config.training_sync_interval, self.servicer.broadcast_training_sync
                    )
                )
            )
        log.info(
            "kernelhub listening on %s:%d (%s)%s",
            self.config.host,
            self.port,
            mask_url(self.config.database_url),
            f"; metrics on :{self.metrics_endpoint.port}/metrics" if self.metrics_endpoint else "",
        )
        return self.port

    async def _stop_metrics(self) -> None:
        endpoint, self.metrics_endpoint = self.metrics_endpoint, None
        if endpoint is not None:
            await endpoint.stop()

    async def issue_token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> str:
        issued: IssuedToken = await self.store.issue_token(agent_id, ttl, role)
        return issued.token

    async def _end_revoked_streams(self) -> None:
        """A revoked or expired token loses its live stream within one re-check interval."""
        connections = [*self.router.connections(), *self.router.watchers()]
        valid = await self.store.valid_token_hashes({c.token_hash for c in connections})
        for connection in connections:
            if connection.token_hash not in valid:
                connection.end(
                    grpc.StatusCode.UNAUTHENTICATED, "the token was revoked or has expired"
                )

    def _commit_answered(self, database_up: bool) -> None:
        """The committer's word after each batch. While the database is down, the reaper's
        commit every `reaper_interval` is the probe that notices its return."""
        if database_up != self._database_up:
            self._database_up = database_up
            self._health_changed.set()

    async def _follow_database(self) -> None:
        """Health tells the truth: NOT_SERVING while commits fail UNAVAILABLE, SERVING again
        after the first that succeeds."""
        while True:
            await self._health_changed.wait()
            self._health_changed.clear()
            up = self._database_up
            if up:
                log.info("the database answers again: health SERVING")
            else:
                log.warning("the database or the writer is down: health NOT_SERVING")
            await self._set_health(serving=up)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _expire_due(self) -> None:
        """Deadline expiry, and (replicas) a dead replica's agents going offline: on the
        leader only. Another replica commits an empty batch while its commits fail, the
        probe that notices the database's return."""
        if self.leases is not None and not self.leases.is_leader():
            self._orphans_due = 0.0  # should it lead, at once
            if not self._database_up:
                await self.committer.submit(cmd.ExpireDue(batch_limit=0))
            return
        await self.committer.submit(cmd.ExpireDue())
        if self.leases is not None:
            clock = asyncio.get_running_loop().time()
            orphans = clock >= self._orphans_due
            if orphans:
                self._orphans_due = clock + self.leases.lease
            while (await self.committer.submit(cmd.ExpireReplicas(orphans=orphans))).more:
                pass

    async def _lease_lost(self, oldest_seq: int) -> None:
        """This replica's lease had expired (it was paused or cut off) and is taken again:
        every stream it carried ends, since the others may have marked those agents offline
        and pruned below `oldest_seq` what its readers needed; they reconnect and resume."""
        self.retention.oldest_seq = max(self.retention.oldest_seq, oldest_seq)
        if self.follower is not None:
            self.follower.skip_to(oldest_seq)
        self._end_streams()

    def _log_gap(self, first_seq: int) -> None:
        """The follower found events it owed pruned (this replica's lease ran out): resumes
        below `first_seq` are refused from now on, and every stream ends as at a lost lease."""
        self.retention.oldest_seq = max(self.retention.oldest_seq, first_seq)
        self._end_streams()

    def _end_streams(self) -> None:
        """This replica's lease ran out (or was lost): every stream it carries ends now,
        before it could be handed events after a hole; they reconnect and resume."""
        for stream in (*self.router.connections(), *self.router.watchers()):
            stream.end(grpc.StatusCode.UNAVAILABLE, LEASE_LOST)

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except StatusError as error:
                log.warning("%s: %s", getattr(job, "__name__", "periodic job"), error.message)
            except Exception:
                log.exception("periodic job failed")

    async def stop(self) -> None:
        """Stop taking messages, commit and acknowledge what was read, end streams, shut down."""
        if self._server is None:
            return
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await self._set_health(serving=False)  # after _follow_database, which could undo it
        # One grace for the whole stop: what a stream that does not read held up in the
        # drain is not waited for again by the server.
        clock = asyncio.get_running_loop()
        deadline = clock.time() + self.config.shutdown_grace
        await self.servicer.drain(self.config.shutdown_grace)
        if self.follower is not None:
            await self.follower.stop()
        if self.leases is not None:
            await self.leases.stop()
        # Every stream has been ended: the server waits only for the handlers to send their
        # status (at least END_FLOOR, or a slow drain would have them cancelled before it).
        await self._server.stop(max(END_FLOOR, deadline - clock.time()))
        self._server = None
        await self.servicer.sessions.settle()
        await self._stop_metrics()
        await self.store.close()
        log.info("kernelhub stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def server_credentials(config: HubConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files; mutual TLS when a client CA is set."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )

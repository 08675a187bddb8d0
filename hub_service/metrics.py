"""The hub's Prometheus metrics: every metric's definition, its pre-resolved label children
for the hot path, and the scrape endpoint (`--metrics-port`).

Each hub owns a registry of its own (two hubs in one process, as the tests run them, never
mix their counts). Labels are bounded sets known up front (message kinds, gRPC codes, which
limit): never an agent id. The points that already count things (the committer, the
session, the connection) increment children resolved here once, so the hot path pays one
counter increment, not a label lookup. Gauges read the hub's own state when scraped.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from generated.kernelhub.v1 import hub_pb2 as pb

if TYPE_CHECKING:
    from .lingers import Linger

# What a trainer may send after Hello (a batch carries these; a malformed one is `batch`),
# and `none` for a message with no body.
KINDS = (
    *(f.name for f in pb.ConnectRequest.DESCRIPTOR.oneofs_by_name["body"].fields),
    "none",
)
OUTCOMES = ("committed", "duplicate", "refused")
LIMITS = ("messages", "connects", "connections")
# Seconds a group commit takes: a commit on SQLite is about a millisecond; a down database
# waits out the commit timeout.
COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


@dataclass(frozen=True)
class MetricDoc:
    """One metric as the README's table lists it (scripts/metrics_table.py)."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str


SERVICE = pb.DESCRIPTOR.services_by_name["HubService"]
SERVICE_METHODS = frozenset(f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods)


class HubMetrics:
    """Every metric of one hub, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.docs: list[MetricDoc] = []
        self.connections = self._gauge("kernelhub_connections", "live Connect streams")
        self.messages = self._counter(
            "kernelhub_messages_received_total",
            "trainer messages answered, by kind and outcome (committed: a receipt; duplicate: "
            "a resend's receipt again; refused: a RequestError)",
            ("kind", "outcome"),
        )
        # Children resolved once: the session picks one by (kind, outcome).
        self.received = {
            (kind, outcome): self.messages.labels(kind, outcome)
            for kind in KINDS
            for outcome in OUTCOMES
        }
        errors = self._counter(
            "kernelhub_request_errors_total",
            "RequestErrors answered, by gRPC status code",
            ("code",),
        )
        self.errors = {code: errors.labels(code.name) for code in grpc.StatusCode}
        ended = self._counter(
            "kernelhub_streams_ended_total",
            "Connect streams the hub ended, by the status it sent (OK: the trainer half-closed "
            "and was answered; a trainer that cancels or vanishes is not counted)",
            ("code",),
        )
        self.streams_ended = {code: ended.labels(code.name) for code in grpc.StatusCode}
        self._rpc_errors = self._counter(
            "kernelhub_rpc_errors_total",
            "calls refused or failed, by RPC and gRPC status code: the token checks' refusals "
            "(UNAUTHENTICATED, PERMISSION_DENIED) on every RPC, and the query, admin and "
            "validator RPCs' errors (Connect's own are streams_ended and request_errors)",
            ("method", "code"),
        )
        self.receipts = self._counter(
            "kernelhub_receipts_total", "receipts written to trainers' streams"
        )
        self.events = self._counter(
            "kernelhub_events_delivered_total",
            "events written to trainers' and watchers' streams (live and replayed)",
        )
        self.fallbacks = self._counter(
            "kernelhub_outbound_fallbacks_total",
            "times a connection's live queue was full and it fell back to reading the event log",
        )
        limited = self._counter(
            "kernelhub_rate_limited_total",
            "refusals by a limit: messages (per-agent message rate), connects (per-agent "
            "connect rate), connections (the hub's connection limit)",
            ("limit",),
        )
        self.rate_limited = {limit: limited.labels(limit) for limit in LIMITS}
        self.commit_seconds = self._histogram(
            "kernelhub_commit_duration_seconds",
            "seconds one group commit took (the store's commit, writer round trip included; "
            "counted from the answer before it when it was sent while that one committed)",
            COMMIT_SECONDS,
        )
        self.batch_size = self._histogram(
            "kernelhub_commit_batch_size",
            "commands in one group commit",
            BATCH_SIZES,
        )
        self.commit_queue = self._gauge(
            "kernelhub_commit_queue_depth", "commands waiting for a group commit"
        )
        self.head_seq = self._gauge(
            "kernelhub_log_head_seq", "the seq of the newest event published to the streams"
        )
        self.linger_factor = self._gauge(
            "kernelhub_linger_factor",
            "how much of its setting a linger applies now, by linger (stream: stream_linger, "
            "commit: commit_linger): 0-1, following the load, or 1 with lingers_follow_load off",
            ("linger",),
        )
        self.claims_waiting = self._gauge(
            "kernelhub_validation_claims_waiting",
            "ClaimValidation calls that found nothing to lease and wait for a component",
        )

    def _counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        self.docs.append(MetricDoc(name, "counter", labels, doc))
        # prometheus_client appends `_total` itself: give it the name without.
        return Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)

    def linger_set(self, linger: Linger) -> None:
        """A linger's new factor (lingers.py)."""
        self.linger_factor.labels(linger.name).set(linger.factor)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
        self.docs.append(MetricDoc(name, "gauge", labels, doc))
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        self.docs.append(MetricDoc(name, "histogram", (), doc))
        return Histogram(name, doc, buckets=buckets, registry=self.registry)

    def rpc_error(self, method: str, code: grpc.StatusCode) -> None:
        """One refused or failed call (`method` as gRPC names it; others count as "other",
        so a caller cannot grow the label set)."""
        name = method.rsplit("/", 1)[-1] if method in SERVICE_METHODS else "other"
        self._rpc_errors.labels(name, code.name).inc()

    def observe_state(
        self,
        connections: Callable[[], int],
        queue: Callable[[], int],
        head: Callable[[], int],
        claims: Callable[[], int],
    ) -> None:
        """The gauges read these when scraped (on the scrape's thread: each reads one int)."""
        self.connections.set_function(connections)
        self.commit_queue.set_function(queue)
        self.head_seq.set_function(head)
        self.claims_waiting.set_function(claims)


class _Handler(WSGIRequestHandler):
    """One scrape; nothing logged (a scraper every few seconds would fill the log)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per scrape, for at most `max_clients` at once (more are closed unanswered),
    each given `client_timeout` seconds per read or write: a client that connects and
    stalls holds one thread for that long, never the others, never forever."""

    daemon_threads = True
    max_clients = 8
    client_timeout = 10.0

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_clients)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        request.settimeout(self.client_timeout)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsEndpoint:
    """`/metrics` over HTTP on threads of its own (prometheus_client's WSGI app), so a
    scrape never runs on the event loop, and a slow scraper never holds it up."""

    def __init__(
        self,
        metrics: HubMetrics,
        host: str,
        port: int,
        *,
        max_clients: int = 8,
        client_timeout: float = 10.0,
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._max_clients = max_clients
        self._client_timeout = client_timeout
        self._server: WSGIServer | None = None
        self.port = 0

    def start(self) -> int:
        """Binds (`port` 0 picks a free one) and serves; returns the port. Raises OSError
        for a port in use."""

        class Server(_BoundedServer):
            address_family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            max_clients = self._max_clients
            client_timeout = self._client_timeout

        server = make_server(
            self._host,
            self._port,
            make_wsgi_app(self._metrics.registry),
            Server,
            handler_class=_Handler,
        )
        threading.Thread(target=server.serve_forever, name="kernelhub-metrics", daemon=True).start()
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    async def stop(self) -> None:
        """Stop serving (off the loop: `shutdown` waits for the server's poll)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()

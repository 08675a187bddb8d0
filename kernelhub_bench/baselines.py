"""The in-run baselines: what the hub's figures are divided by.

    python -m kernelhub_bench.baselines serve fanout|oneway   # prints "baseline serving on 127.0.0.1:PORT"
    python -m kernelhub_bench.baselines sqlite --db PATH --count N --batch B   # prints one JSON line

- `fanout`: a bare grpc.aio server on the same proto and generated code: no auth, no
  persistence, no validation. Each share becomes a HubEvent (seq from a counter) that is
  answered at once with a receipt and queued for every other connected stream; each stream's
  sender coalesces its receipts and up to 64 events per write, as the hub does. The hub's
  group commit hands events over in batches, which is what lets it coalesce; the bare server
  has no such batches, so a busy stream lingers (1 ms by default, `--linger-ms`) before a
  write of fewer than 64 events. Without it, every event costs a write of its own and the
  bare server reaches about a third of the hub's fan-out rate. With `--keep-log` events are
  also kept in memory, so a stream that says hello with `resume_after_seq` gets what it
  missed (the replay baseline).
- `oneway`: a bare server that only reads ConnectRequests off a stream; when the client
  half-closes it answers with one receipt whose `seq` is the number of messages it read.
- `sqlite`: raw `sqlite3` `executemany` of the rows a share costs the hub (an event, an
  artifact and an idempotency-ledger row, with the same indexes), in batches of one
  transaction each, WAL and synchronous=NORMAL as the hub runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from .common import EVENTS_PER_RESPONSE, LOOPBACK, server_options, share

Write = Callable[[pb.ConnectResponse], Coroutine[Any, Any, None]]


class BareConnection:
    def __init__(self, agent_id: str, linger: float) -> None:
        self.agent_id = agent_id
        self.linger = linger
        self.events: deque[pb.HubEvent] = deque()
        self.receipts: list[pb.Receipt] = []
        self.wake = asyncio.Event()

    def offer(self, event: pb.HubEvent) -> None:
        self.events.append(event)
        self.wake.set()

    async def run_sender(self, write: Write) -> None:
        """Writes what is waiting, up to 64 events at a time. A busy stream (one written to
        less than `linger` ago) waits out the rest of `linger` unless 64 events are ready:
        at most one write per `linger` per stream, so events coalesce under load, while an
        idle stream's first event goes out at once."""
        loop = asyncio.get_running_loop()
        last_write = -1.0
        while True:
            if not (self.events or self.receipts):
                self.wake.clear()
                await self.wake.wait()
                continue
            since = loop.time() - last_write
            if since < self.linger and len(self.events) < EVENTS_PER_RESPONSE:
                await asyncio.sleep(self.linger - since)
            receipts, self.receipts = self.receipts, []
            count = min(len(self.events), EVENTS_PER_RESPONSE)
            await write(
                pb.ConnectResponse(
                    receipts=receipts, events=[self.events.popleft() for _ in range(count)]
                )
            )
            last_write = loop.time()


class BareHub(hub_pb2_grpc.HubServiceServicer):
    """The fan-out (or, with `oneway`, the one-way ingest) baseline."""

    def __init__(self, oneway: bool, linger: float = 0.001, keep_log: bool = False) -> None:
        self.oneway = oneway
        self.linger = linger
        self.keep_log = keep_log
        self.seq = 0
        self.log: list[pb.HubEvent] = []  # with keep_log, log[i].seq == i + 1
        self.connections: dict[str, BareConnection] = {}

    async def Connect(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Any
    ) -> None:
        try:
            first = await asyncio.wait_for(anext(request_iterator), 10.0)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no hello")
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hello first")
        agent_id = first.hello.agent_id
        welcome = pb.ConnectResponse(
            welcome=pb.Welcome(agent_id=agent_id, head_seq=self.seq, hub_version="bare")
        )
        if self.oneway:
            await context.write(welcome)
            count = 0  # requests read, those inside a batch included
            async for request in request_iterator:
                count += len(request.batch.requests) or 1
            await context.write(
                pb.ConnectResponse(receipts=[pb.Receipt(message_id="count", seq=count)])
            )
            return
        # Registered before the welcome goes out: a client that has its welcome misses nothing.
        connection = BareConnection(agent_id, self.linger)
        connection.events.extend(self.log[first.hello.resume_after_seq :])
        self.connections[agent_id] = connection
        sender: asyncio.Task[None] | None = None
        try:
            await context.write(welcome)
            sender = asyncio.create_task(connection.run_sender(context.write))
            async for request in request_iterator:
                if request.WhichOneof("body") == "share_pattern":
                    self.seq += 1
                    event = pb.HubEvent(
                        seq=self.seq,
                        sender_id=agent_id,
                        artifact_shared=pb.Artifact(
                            artifact_id=f"art_{self.seq:016x}",
                            kind=pb.ARTIFACT_KIND_PATTERN,
                            contributor_id=agent_id,
                            pattern=request.share_pattern.pattern,
                        ),
                    )
                    if self.keep_log:
                        self.log.append(event)
                    for other_id, other in self.connections.items():
                        if other_id != agent_id:
                            other.offer(event)
                    receipt = pb.Receipt(message_id=request.message_id, seq=self.seq)
                else:
                    receipt = pb.Receipt(message_id=request.message_id)
                connection.receipts.append(receipt)
                connection.wake.set()
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sender
            if self.connections.get(agent_id) is connection:
                del self.connections[agent_id]

    async def GetHubStats(
        self, request: pb.GetHubStatsRequest, context: Any
    ) -> pb.GetHubStatsResponse:
        return pb.GetHubStatsResponse(
            head_seq=self.seq, agents_online=len(self.connections), hub_version="bare"
        )

    # The queries are not part of any baseline.
    async def _unimplemented(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the bare baseline")

    ListAgents = ListArtifacts = GetArtifact = _unimplemented
    ListCollaborations = ListFeatureRequests = _unimplemented
    IssueToken = ListTokens = RevokeToken = _unimplemented
    Watch = _unimplemented  # type: ignore[assignment]  # a stream, refused before any item
    ClaimValidation = SubmitVerdict = _unimplemented


async def serve(mode: str, linger: float, keep_log: bool) -> None:
    server = grpc.aio.server(options=server_options())
    servicer = BareHub(oneway=mode == "oneway", linger=linger, keep_log=keep_log)
    hub_pb2_grpc.add_HubServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{LOOPBACK}:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"baseline {mode} serving on {LOOPBACK}:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


# --- raw SQLite ------------------------------------------------------------------

# The shape of the hub's tables for a share (hub_service/models.py), without the ORM.
SCHEMA = """
CREATE TABLE event (seq BIGINT PRIMARY KEY, sender_id VARCHAR(128) NOT NULL,
    broadcast BOOLEAN NOT NULL, created_at DATETIME NOT NULL, body BLOB NOT NULL);
CREATE TABLE artifact (artifact_id VARCHAR(64) PRIMARY KEY, seq BIGINT NOT NULL UNIQUE,
    kind INTEGER NOT NULL, contributor_id VARCHAR(128) NOT NULL, specialization INTEGER NOT NULL,
    name VARCHAR NOT NULL, created_at DATETIME NOT NULL, body BLOB NOT NULL);
CREATE INDEX ix_artifact_kind_seq ON artifact (kind, seq);
CREATE INDEX ix_artifact_contributor_seq ON artifact (contributor_id, seq);
CREATE INDEX ix_artifact_specialization_seq ON artifact (specialization, seq);
CREATE TABLE received_message (agent_id VARCHAR(128) NOT NULL, message_id VARCHAR(128) NOT NULL,
    seq BIGINT NOT NULL, resource_id VARCHAR NOT NULL, created_at DATETIME NOT NULL,
    PRIMARY KEY (agent_id, message_id));
"""


def sqlite_ingest(path: Path, count: int, batch: int) -> dict[str, Any]:
    """Shares/s that raw executemany reaches for the hub's rows (rows built beforehand)."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(SCHEMA)
    agent = "bench_00000"
    now = datetime.now(UTC).isoformat(" ")
    events, artifacts, ledger = [], [], []
    for seq in range(1, count + 1):
        request = share(f"m{seq}", f"s.{seq}")
        artifact = pb.Artifact(
            artifact_id=f"art_{seq:028x}",
            kind=pb.ARTIFACT_KIND_PATTERN,
            contributor_id=agent,
            pattern=request.share_pattern.pattern,
        )
        artifact.create_time.GetCurrentTime()
        event = pb.HubEvent(seq=seq, sender_id=agent, artifact_shared=artifact)
        event.create_time.CopyFrom(artifact.create_time)
        events.append((seq, agent, True, now, event.SerializeToString()))
        artifacts.append(
            (
                artifact.artifact_id,
                seq,
                artifact.kind,
                agent,
                pb.SPECIALIZATION_NETWORKING,
                "networking_pattern",
                now,
                artifact.SerializeToString(),
            )
        )
        ledger.append((agent, request.message_id, seq, artifact.artifact_id, now))
    start = time.perf_counter()
    for low in range(0, count, batch):
        high = low + batch
        connection.execute("BEGIN")
        connection.executemany("INSERT INTO event VALUES (?, ?, ?, ?, ?)", events[low:high])
        connection.executemany(
            "INSERT INTO artifact VALUES (?, ?, ?, ?, ?, ?, ?, ?)", artifacts[low:high]
        )
        connection.executemany(
            "INSERT INTO received_message VALUES (?, ?, ?, ?, ?)", ledger[low:high]
        )
        connection.execute("COMMIT")
    seconds = time.perf_counter() - start
    connection.close()
    return {"rate": count / seconds, "count": count, "batch": batch, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernelhub_bench.baselines", description=__doc__
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run a bare gRPC baseline server")
    serve_parser.add_argument("mode", choices=["fanout", "oneway"])
    serve_parser.add_argument(
        "--linger-ms",
        type=float,
        default=1.0,
        help="a busy stream writes at most once per this long unless 64 events wait (default 1)",
    )
    serve_parser.add_argument(
        "--keep-log",
        action="store_true",
        help="keep every event in memory to replay it (the replay baseline; off elsewhere, "
        "so a growing heap does not slow the other baselines' garbage collection)",
    )
    sqlite_parser = commands.add_parser("sqlite", help="raw SQLite executemany ingest")
    sqlite_parser.add_argument("--db", type=Path, required=True)
    sqlite_parser.add_argument("--count", type=int, required=True)
    sqlite_parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(serve(args.mode, args.linger_ms / 1000, args.keep_log))
    else:
        print(json.dumps({"result": sqlite_ingest(args.db, args.count, args.batch)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

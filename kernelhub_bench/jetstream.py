"""The NATS JetStream peer's load: the same measurements as load.py, through nats-py.

    python -m kernelhub_bench.jetstream SCENARIO --url nats://127.0.0.1:PORT
        [--server-pid PID] [--params JSON] [--deadline SECONDS]

Scenarios: `latency` (at the given absolute `rates`), `ingest` and `fanout`. The shape is
kernelhub's: one sender publishes a pattern-sized message (the serialized share_pattern the
hub's load sends) to a file-backed stream with publish-with-ack, at most `window` awaiting
their ack; `receivers` push consumers (one ephemeral consumer each, new messages only, no
acks, like a hub stream) read on one connection, as 50 hub trainers share one channel, and
parse each message. Prints one JSON line like load.py's; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from generated.kernelhub.v1 import hub_pb2 as pb

from .common import SEND_WINDOW, paced, percentile, record_latency, share, timed_id
from .load import BenchError, CpuMeter, Deadline, bounded, emit

STREAM = "KERNELHUB_BENCH"
SUBJECT = "bench.shares"


@dataclass
class Consumer:
    """One receiver: counts the messages and, when asked, measures due -> delivery from the
    due time the sender stamped into each pattern id (as load.Receiver does)."""

    record_latency: bool
    got: int = 0
    want: int = 0
    warmup: int = 0
    done_at: float = 0.0
    latencies: dict[int, list[int]] = field(default_factory=dict)
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, total: int) -> None:
        self.want = total
        if self.got >= total:
            self.reached.set()
        else:
            self.reached.clear()

    async def on_message(self, msg: Msg) -> None:
        now = time.perf_counter_ns()
        request = pb.ConnectRequest.FromString(msg.data)
        self.got += 1
        if self.record_latency:
            pattern_id = request.share_pattern.pattern.pattern_id
            record_latency(self.latencies, pattern_id, self.warmup, now)
        if self.want and self.got >= self.want and not self.reached.is_set():
            self.done_at = now / 1e9
            self.reached.set()


@dataclass
class Swarm:
    """The sender's and the receivers' connections, the stream and its consumers."""

    sender: NATS
    js: JetStreamContext
    receivers_conn: NATS
    consumers: list[Consumer]
    acked: int = 0
    failed: int = 0
    first_error: str = ""

    def expect(self, total: int) -> None:
        for consumer in self.consumers:
            consumer.expect(total)

    async def all_reached(self, deadline: Deadline) -> float:
        for consumer in self.consumers:
            if not consumer.reached.is_set():
                what = f"{consumer.want} deliveries (a consumer had {consumer.got})"
                await bounded(consumer.reached.wait(), deadline, what)
        return max((c.done_at for c in self.consumers), default=0.0)

    async def publish(self, payload: bytes, deadline: Deadline) -> None:
        """Publishes with ack; waits only for room in the window (the ack counts when it comes)."""
        future = await bounded(
            self.js.publish_async(SUBJECT, payload, wait_stall=deadline.left()),
            deadline,
            "room in the publish window",
        )
        future.add_done_callback(self._acked)

    def _acked(self, future: asyncio.Future[api.PubAck]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            if not self.first_error:
                self.first_error = "cancelled" if future.cancelled() else repr(future.exception())
        else:
            self.acked += 1

    async def all_acked(self, deadline: Deadline) -> None:
        await bounded(self.js.publish_async_completed(), deadline, "the last publish acks")
        if self.failed:
            raise BenchError(f"{self.failed} publishes failed; first: {self.first_error}")

    async def close(self) -> None:
        for connection in (self.sender, self.receivers_conn):
            with contextlib.suppress(Exception):
                await connection.close()


async def connect(url: str, params: dict[str, Any], deadline: Deadline, record: bool) -> Swarm:
    """A fresh stream (file storage, one subject) and `receivers` consumers of new messages."""
    receivers = int(params.get("receivers", 0))
    window = int(params.get("window", SEND_WINDOW))
    options = {"connect_timeout": 10, "max_reconnect_attempts": 0, "allow_reconnect": False}
    sender = await bounded(nats.connect(url, **options), deadline, "a NATS connection")
    try:
        receivers_conn = await bounded(nats.connect(url, **options), deadline, "a NATS connection")
    except BaseException:
        await sender.close()
        raise
    js = sender.jetstream(publish_async_max_pending=window)
    swarm = Swarm(sender, js, receivers_conn, [])
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bounded(js.delete_stream(STREAM), deadline, "deleting the stream")
        await bounded(
            js.add_stream(name=STREAM, subjects=[SUBJECT], storage=api.StorageType.FILE),
            deadline,
            "creating the stream",
        )
        their_js = receivers_conn.jetstream()
        for _ in range(receivers):
            consumer = Consumer(record)
            await bounded(
                their_js.subscribe(
                    SUBJECT,
                    cb=consumer.on_message,
                    deliver_policy=api.DeliverPolicy.NEW,
                    config=api.ConsumerConfig(ack_policy=api.AckPolicy.NONE),
                ),
                deadline,
                "a push consumer",
            )
            swarm.consumers.append(consumer)
        await bounded(receivers_conn.flush(), deadline, "the consumers' subscriptions")
    except BaseException:
        await swarm.close()
        raise
    return swarm


def payload(message_id: str, pattern_id: str) -> bytes:
    """The bytes the hub's load sends for one share: same size, same parsing on receipt."""
    return share(message_id, pattern_id).SerializeToString()


async def scenario_latency(
    url: str, params: dict[str, Any], pid: int | None, deadline: Deadline
) -> dict[str, Any]:
    """One open-loop point per absolute rate in `rates`, as load.scenario_latency measures."""
    duration = float(params["duration"])
    warmup = float(params.get("warmup", 0.2))
    rates = [float(r) for r in params["rates"]]
    fractions = [float(f) for f in params.get("fractions", [0.0] * len(rates))]
    tag = uuid.uuid4().hex[:8]
    swarm = await connect(url, params, deadline, record=True)
    sent = 0
    try:
        points = []
        for point, (fraction, rate) in enumerate(zip(fractions, rates, strict=True)):
            n = max(10, round(rate * duration))
            for consumer in swarm.consumers:
                consumer.warmup = int(n * warmup)
            await asyncio.sleep(0.2)  # let the previous point's tail settle
            swarm.expect(sent + n)
            meter = CpuMeter(pid)
            meter.start()
            async for i, due in paced(rate, n):
                await swarm.publish(
                    payload(f"{tag}-p{point}-{i}", timed_id(point, i, due)), deadline
                )
            sent += n
            await swarm.all_reached(deadline)
            cpu = meter.stop()
            samples = [ns for c in swarm.consumers for ns in c.latencies.get(point, [])]
            points.append(
                {
                    "fraction": fraction,
                    "offered_shares_per_s": rate,
                    "offered_deliveries_per_s": rate * len(swarm.consumers),
                    "shares": n,
                    "samples": len(samples),
                    "p50_ms": percentile(samples, 50) / 1e6,
                    "p99_ms": percentile(samples, 99) / 1e6,
                    "max_ms": max(samples, default=0) / 1e6,
                    **cpu,
                }
            )
        await swarm.all_acked(deadline)
        return {"receivers": len(swarm.consumers), "max_shares_per_s": 0.0, "points": points}
    finally:
        await swarm.close()


async def scenario_ingest(
    url: str, params: dict[str, Any], pid: int | None, deadline: Deadline
) -> dict[str, Any]:
    """`count` durable publishes with ack, `window` in flight; timed until the last ack."""
    count = int(params["count"])
    tag = uuid.uuid4().hex[:8]
    messages = [payload(f"{tag}-i{i}", f"i.{i}") for i in range(count)]
    swarm = await connect(url, {**params, "receivers": 0}, deadline, record=False)
    try:
        meter = CpuMeter(pid)
        meter.start()
        start = time.perf_counter()
        for message in messages:
            await swarm.publish(message, deadline)
        await swarm.all_acked(deadline)
        seconds = time.perf_counter() - start
        cpu = meter.stop()
        if swarm.acked != count:
            raise BenchError(f"{swarm.acked} of {count} publishes acked")
        return {"rate": count / seconds, "count": count, "seconds": seconds, **cpu}
    finally:
        await swarm.close()


async def scenario_fanout(
    url: str, params: dict[str, Any], pid: int | None, deadline: Deadline
) -> dict[str, Any]:
    """`count` publishes as fast as the window allows; deliveries/s until every consumer has all."""
    count = int(params["count"])
    tag = uuid.uuid4().hex[:8]
    messages = [payload(f"{tag}-f{i}", f"f.{i}") for i in range(count)]
    swarm = await connect(url, params, deadline, record=False)
    try:
        swarm.expect(count)
        meter = CpuMeter(pid)
        meter.start()
        start = time.perf_counter()
        for message in messages:
            await swarm.publish(message, deadline)
        end = await swarm.all_reached(deadline)
        cpu = meter.stop()
        await swarm.all_acked(deadline)
        seconds = end - start
        receivers = len(swarm.consumers)
        return {
            "rate": count * receivers / seconds,
            "shares_per_s": count / seconds,
            "receivers": receivers,
            "count": count,
            "seconds": seconds,
            **cpu,
        }
    finally:
        await swarm.close()


Scenario = Callable[[str, dict[str, Any], int | None, Deadline], Awaitable[dict[str, Any]]]
SCENARIOS: dict[str, Scenario] = {
    "latency": scenario_latency,
    "ingest": scenario_ingest,
    "fanout": scenario_fanout,
}


async def _main(args: argparse.Namespace) -> int:
    deadline = Deadline(args.deadline)
    try:
        result = await asyncio.wait_for(
            SCENARIOS[args.scenario](args.url, json.loads(args.params), args.server_pid, deadline),
            args.deadline + 5,
        )
    except (BenchError, TimeoutError, nats.errors.Error, OSError) as exc:
        emit({"scenario": args.scenario, "error": str(exc) or type(exc).__name__})
        return 2
    emit({"scenario": args.scenario, "result": result})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kernelhub_bench.jetstream", description=__doc__
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--url", required=True, help="nats://127.0.0.1:PORT")
    parser.add_argument("--server-pid", type=int, help="nats-server's, to measure its CPU")
    parser.add_argument("--params", default="{}", help="the scenario's sizes, as JSON")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for everything")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

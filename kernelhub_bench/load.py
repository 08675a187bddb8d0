"""The load: many simulated trainers on one event loop, speaking the raw wire protocol.

    python -m kernelhub_bench.load SCENARIO --target 127.0.0.1:PORT [--tokens FILE]
        [--server-pid PID] [--params JSON] [--deadline SECONDS]

Scenarios: `ingest`, `ingest_client`, `fanout`, `latency`, `idle`, `replay`. Each prints one JSON
line with its result on stdout (`idle` prints a `{"phase": "connected"}` line
first and holds its trainers until a line arrives on stdin). Without `--tokens`
the trainers use placeholder tokens (for the baselines, which check none).
Every wait is bounded by the scenario's deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import psutil

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.complementarity import complements
from hub_service.subscriptions import Filter, tags_of

from .common import (
    EOF,
    SEND_WINDOW,
    Call,
    async_stub,
    auth,
    fake_tokens,
    hello,
    make_channel,
    median,
    paced,
    pattern,
    percentile,
    read_tokens,
    record_latency,
    share,
    timed_id,
)

# How long any single expected message may take before the scenario fails.
STEP_TIMEOUT = 60.0


class BenchError(Exception):
    """The scenario could not be measured (the server refused, a stream ended, a wait ran out)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, cap: float = STEP_TIMEOUT) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise BenchError("the scenario's deadline passed")
        return min(left, cap)


async def bounded(awaitable: Awaitable[Any], deadline: Deadline, what: str) -> Any:
    try:
        return await asyncio.wait_for(awaitable, deadline.left())
    except TimeoutError:
        raise BenchError(f"timed out waiting for {what}") from None


async def wait_unless_ended(
    event: asyncio.Event, readers: Collection[asyncio.Task[Any]], deadline: Deadline, what: str
) -> None:
    """Waits for `event`; fails at once, with the reason, if a stream's reader ends first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, *readers}, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    if event.is_set():
        return
    reader = next((r for r in readers if r in done), None)
    if reader is not None:
        error = None if reader.cancelled() else reader.exception()
        if isinstance(error, grpc.aio.AioRpcError):
            reason = f"{error.code().name}: {error.details()}"
        else:
            reason = repr(error) if error else "the server ended it"
        raise BenchError(f"a stream ended while waiting for {what}: {reason}")
    raise BenchError(f"timed out waiting for {what}")


# --- measuring CPU ----------------------------------------------------------------


class CpuMeter:
    """CPU used over an interval, in cores: by the server process (with its children: the
    hub's writer process), by this load process, and by everything else on the machine
    (other work competes for the same cores).

    The server's share is also split three ways, so a reader sees which part of it was the
    bottleneck: its main thread (the hub's and the bare server's event loop), its other
    threads (gRPC's completion-queue poller and engine threads, the hub's reader threads) and
    its child processes (the hub's writer). Threads are read where the platform lists them
    (Linux, macOS, Windows); elsewhere everything counts as the main thread."""

    def __init__(self, server_pid: int | None) -> None:
        self._server = psutil.Process(server_pid) if server_pid else None
        self._wall = 0.0
        self._server_cpu = _ServerCpu()
        self._client_cpu = 0.0
        self._busy = 0.0

    def _server_seconds(self) -> _ServerCpu:
        if self._server is None:
            return _ServerCpu()
        main = threads = children = 0.0
        with contextlib.suppress(psutil.NoSuchProcess):
            own = _cpu_seconds(self._server)
            try:
                by_thread = {t.id: t.user_time + t.system_time for t in self._server.threads()}
            except (psutil.AccessDenied, NotImplementedError):
                by_thread = {}
            # On Linux the main thread's id is the process id; elsewhere the first listed.
            main = by_thread.get(self._server.pid, next(iter(by_thread.values()), own))
            threads = max(0.0, own - main)
            for child in self._server.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    children += _cpu_seconds(child)
        return _ServerCpu(main, threads, children)

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()._asdict()
        busy = ("user", "nice", "system", "irq", "softirq", "steal")  # guest is within user
        return float(sum(times.get(name, 0.0) for name in busy))

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._server_cpu = self._server_seconds()
        self._client_cpu = time.process_time()
        self._busy = self._machine_busy()

    def stop(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self._wall, 1e-9)
        end, start = self._server_seconds(), self._server_cpu
        main, threads, children = (max(0.0, b - a) / wall for a, b in zip(start, end, strict=True))
        server = main + threads + children
        client = (time.process_time() - self._client_cpu) / wall
        busy = (self._machine_busy() - self._busy) / wall
        return {
            "server_cores": round(server, 3),
            "server_main_thread_cores": round(main, 3),
            "server_other_threads_cores": round(threads, 3),
            "server_children_cores": round(children, 3),
            "client_cores": round(client, 3),
            "other_cores": round(max(0.0, busy - server - client), 3),
        }


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


class _ServerCpu(NamedTuple):
    """Cumulative CPU seconds of the server's main thread, other threads and children."""

    main: float = 0.0
    threads: float = 0.0
    children: float = 0.0


# --- streams ------------------------------------------------------------------------


class ChannelPool:
    """One channel (one TCP connection) per `per_channel` trainers."""

    def __init__(self, target: str, per_channel: int) -> None:
        self.target = target
        self.per_channel = max(1, per_channel)
        self._channels: list[grpc.aio.Channel] = []

    def channel(self, index: int) -> grpc.aio.Channel:
        while len(self._channels) <= index // self.per_channel:
            self._channels.append(make_channel(self.target))
        return self._channels[index // self.per_channel]

    def extra(self) -> grpc.aio.Channel:
        """A channel of its own (for a sender, so its messages queue behind nobody's)."""
        channel = make_channel(self.target)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close(None)
        self._channels.clear()


class Opened:
    """A Connect call once welcomed. The hub writes its welcome with whatever is ready beside
    it (the first training sync, the roster's first part, replayed events): the first read
    gives that back, so a reader misses nothing of the first response."""

    def __init__(self, call: Call, first: pb.ConnectResponse) -> None:
        self._call = call
        first.ClearField("welcome")
        # ListFields, not ByteSize: that would size a whole roster to learn it is not empty.
        self._first: pb.ConnectResponse | None = first if first.ListFields() else None

    async def read(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._call.read()

    async def write(self, request: pb.ConnectRequest) -> None:
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> bool:
        return bool(self._call.cancel())


async def open_stream(
    channel: grpc.aio.Channel,
    agent_id: str,
    token: str,
    resume: int,
    deadline: Deadline,
    specialization: pb.Specialization.ValueType = pb.SPECIALIZATION_NETWORKING,
    subscription: pb.Subscription | None = None,
) -> Call:
    """Connect, say hello and wait for the welcome; returns the live call (`Opened`)."""
    call = async_stub(channel).Connect(metadata=auth(token))
    request = hello(agent_id, resume)
    request.hello.specialization = specialization
    if subscription is not None:
        request.hello.subscription.CopyFrom(subscription)
    try:
        await bounded(call.write(request), deadline, f"{agent_id}'s hello")
        first = await bounded(call.read(), deadline, f"{agent_id}'s welcome")
    except grpc.aio.AioRpcError as exc:
        raise BenchError(f"{agent_id}: {exc.code().name}: {exc.details()}") from None
    if first is EOF or not first.HasField("welcome"):
        call.cancel()
        raise BenchError(f"{agent_id}: no welcome (got {first!r:.200})")
    return Opened(call, first)


async def head_seq(channel: grpc.aio.Channel, token: str, deadline: Deadline) -> int:
    stats = await bounded(
        async_stub(channel).GetHubStats(pb.GetHubStatsRequest(), metadata=auth(token)),
        deadline,
        "GetHubStats",
    )
    return int(stats.head_seq)


async def close_calls(calls: Iterable[Call]) -> None:
    for call in calls:
        call.cancel()
    await asyncio.sleep(0)


class Sender:
    """One trainer that pipelines messages: at most `window` await their answer at a time."""

    def __init__(self, call: Call, window: int = SEND_WINDOW) -> None:
        self.call = call
        self.window = window
        self.sent = 0
        self.receipts = 0
        self.errors = 0
        self.first_error = ""
        self.last_seq = 0
        self._room = asyncio.Event()
        self._answered = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @property
    def outstanding(self) -> int:
        return self.sent - self.receipts - self.errors

    async def _read(self) -> None:
        while True:
            response = await self.call.read()
            if response is EOF:
                return
            if response.receipts:
                self.receipts += len(response.receipts)
                self.last_seq = max(self.last_seq, max(r.seq for r in response.receipts))
            if response.errors:
                self.errors += len(response.errors)
                if not self.first_error:
                    error = response.errors[0]
                    self.first_error = f"{error.code_name}: {error.message}"
            if response.receipts or response.errors:
                self._room.set()
                if self.outstanding <= 0:
                    self._answered.set()

    async def send(self, request: pb.ConnectRequest, deadline: Deadline) -> None:
        answers = len(request.batch.requests) if request.HasField("batch") else 1
        while self.outstanding + answers > self.window:
            self._room.clear()
            await bounded(self._room.wait(), deadline, "room in the send window")
        self.sent += answers
        self._answered.clear()
        await self.call.write(request)

    async def all_answered(self, deadline: Deadline) -> None:
        while self.outstanding > 0:
            self._answered.clear()
            what = f"the last receipts ({self.outstanding} unanswered)"
            await wait_unless_ended(self._answered, (self._reader,), deadline, what)

    def close(self) -> None:
        self._reader.cancel()
        self.call.cancel()


class Receiver:
    """A trainer that reads its stream and counts the shares of one sender (and, when asked,
    the share->delivery latency that the sender stamped into each pattern id)."""

    def __init__(self, call: Call, sender_id: str, record_latency: bool = False) -> None:
        self.call = call
        self.sender_id = sender_id
        self.record_latency = record_latency
        self.got = 0
        self.other_events = 0
        self.responses = 0
        self.want = 0
        self.done_at = 0.0
        self.latencies: dict[int, list[int]] = {}  # point -> nanoseconds
        self.warmup = 0
        self._reached = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    def expect(self, total: int) -> None:
        """Wait (with `reached`) until `total` shares of the sender have arrived in all."""
        self.want = total
        if self.got >= total:
            self._reached.set()
        else:
            self._reached.clear()

    async def reached(self, deadline: Deadline) -> float:
        if not self._reached.is_set():
            what = f"{self.want} deliveries (a receiver had {self.got})"
            await wait_unless_ended(self._reached, (self.task,), deadline, what)
        return self.done_at

    async def _run(self) -> None:
        sender_id = self.sender_id
        while True:
            response = await self.call.read()
            if response is EOF:
                return
            if not response.events:
                continue
            self.responses += 1
            now = time.perf_counter_ns()
            for event in response.events:
                if event.sender_id != sender_id or not event.HasField("artifact_shared"):
                    self.other_events += 1
                    continue
                self.got += 1
                if self.record_latency:
                    pattern_id = event.artifact_shared.pattern.pattern_id
                    record_latency(self.latencies, pattern_id, self.warmup, now)
            if self.want and self.got >= self.want and not self._reached.is_set():
                self.done_at = now / 1e9
                self._reached.set()


async def send_all(
    sender: Sender, requests: list[pb.ConnectRequest], deadline: Deadline, tenths: bool = True
) -> tuple[float, list[float]]:
    """Pipelines `requests` and waits for every answer. Returns the seconds it took and the
    answer rate over each tenth of the run (a rate that falls as the run goes on means the
    server slows down as its tables grow)."""
    start = time.perf_counter()
    marks = [(start, 0)]
    step = max(1, len(requests) // 10)
    for i, request in enumerate(requests, 1):
        await sender.send(request, deadline)
        if tenths and i % step == 0:
            marks.append((time.perf_counter(), sender.receipts + sender.errors))
    await sender.all_answered(deadline)
    end = time.perf_counter()
    marks.append((end, sender.receipts + sender.errors))
    rates = [(n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in itertools.pairwise(marks) if t1 > t0]
    return end - start, rates


@dataclass
class Swarm:
    """Receivers plus one sender, connected to one server."""

    pool: ChannelPool
    sender: Sender
    sender_id: str
    receivers: list[Receiver] = field(default_factory=list)

    async def close(self) -> None:
        self.sender.close()
        for receiver in self.receivers:
            receiver.task.cancel()
        await close_calls(r.call for r in self.receivers)
        await self.pool.close()

    def expect(self, total: int) -> None:
        for receiver in self.receivers:
            receiver.expect(total)

    def events_per_response(self) -> float:
        """How well the server coalesced: events per response that carried any."""
        responses = sum(r.responses for r in self.receivers)
        events = sum(r.got + r.other_events for r in self.receivers)
        return events / responses if responses else 0.0

    async def all_reached(self, deadline: Deadline) -> float:
        """Waits for every receiver; returns when the last one got its last share (seconds)."""
        return max([await r.reached(deadline) for r in self.receivers], default=0.0)


async def connect_swarm(
    args: Context, receivers: int, record_latency: bool, deadline: Deadline
) -> Swarm:
    tokens = args.tokens(receivers + 1)
    (sender_id, sender_token), rest = tokens[0], tokens[1:]
    pool = ChannelPool(args.target, args.params.get("per_channel", 50))
    sender_channel = pool.extra()
    # Connect the sender first and resume everyone after the head: nobody replays history.
    sender_call = await open_stream(
        sender_channel,
        sender_id,
        sender_token,
        await head_seq(sender_channel, sender_token, deadline),
        deadline,
    )
    swarm = Swarm(pool, Sender(sender_call, args.params.get("window", SEND_WINDOW)), sender_id)
    try:
        resume = await head_seq(sender_channel, sender_token, deadline)
        limit = asyncio.Semaphore(args.params.get("connect_concurrency", 50))

        async def join(index: int, agent_id: str, token: str) -> None:
            async with limit:
                call = await open_stream(pool.channel(index), agent_id, token, resume, deadline)
            swarm.receivers.append(Receiver(call, sender_id, record_latency))

        await asyncio.gather(*(join(i, a, t) for i, (a, t) in enumerate(rest)))
    except BaseException:
        await swarm.close()
        raise
    return swarm


# --- scenarios -------------------------------------------------------------------------


@dataclass
class Context:
    target: str
    params: dict[str, Any]
    server_pid: int | None
    token_file: Path | None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def tokens(self, count: int) -> list[tuple[str, str]]:
        pairs = read_tokens(self.token_file) if self.token_file else fake_tokens(count)
        if len(pairs) < count:
            raise BenchError(f"need {count} tokens, {self.token_file} has {len(pairs)}")
        return pairs[:count]


async def scenario_ingest(args: Context, deadline: Deadline) -> dict[str, Any]:
    """One trainer shares `count` patterns, `batch` per stream message (default 1). Durable:
    pipelined with a window, timed until the last receipt. One-way (`oneway`, for the
    raw-ingest baseline): written back to back, timed until the server says it has read them
    all."""
    count = int(args.params["count"])
    oneway = bool(args.params.get("oneway", False))
    ((agent_id, token),) = args.tokens(1)
    pool = ChannelPool(args.target, 1)
    meter = CpuMeter(args.server_pid)
    try:
        channel = pool.extra()
        resume = await head_seq(channel, token, deadline)
        call = await open_stream(channel, agent_id, token, resume, deadline)
        requests = [share(f"{args.tag}-i{i}", f"i.{i}") for i in range(count)]
        batch = int(args.params.get("batch", 1))
        if batch > 1:  # `batch` shares per stream message (RequestBatch), answered one by one
            requests = [
                pb.ConnectRequest(
                    message_id=f"{args.tag}-b{start}",
                    batch=pb.RequestBatch(requests=requests[start : start + batch]),
                )
                for start in range(0, count, batch)
            ]
        if oneway:
            meter.start()
            start = time.perf_counter()
            for request in requests:
                await call.write(request)
            await call.done_writing()
            while True:
                response = await bounded(call.read(), deadline, "the count of messages read")
                if response is EOF:
                    raise BenchError("the one-way server closed without a count")
                if response.receipts:
                    break
            seconds = time.perf_counter() - start
            cpu = meter.stop()
            read = response.receipts[0].seq
            if read != count:
                raise BenchError(f"the one-way server read {read} of {count} messages")
            call.cancel()
            return {"rate": count / seconds, "count": count, "seconds": seconds, **cpu}
        sender = Sender(call, int(args.params.get("window", SEND_WINDOW)))
        meter.start()
        seconds, progress = await send_all(sender, requests, deadline)
        cpu = meter.stop()
        sender.close()
        if sender.errors:
            raise BenchError(
                f"{sender.errors} of {count} shares refused; first: {sender.first_error}"
            )
        return {
            "rate": count / seconds,
            "count": count,
            "seconds": seconds,
            "rate_by_tenth": progress,
            **cpu,
        }
    finally:
        await pool.close()


async def scenario_ingest_client(args: Context, deadline: Deadline) -> dict[str, Any]:
    """One trainer shares `count` patterns through the SDK's `HubClient`, `window` awaiting
    their receipt at a time (the client batches whatever is waiting into one stream message
    by itself); timed until the last receipt."""
    # Only this scenario needs the SDK.
    from trainer_service.sdk.client import HubClient
    from trainer_service.sdk.errors import HubError

    count = int(args.params["count"])
    window = int(args.params.get("window", SEND_WINDOW))
    ((agent_id, token),) = args.tokens(1)
    patterns = [pattern(f"i.{args.tag}.{i}") for i in range(count)]
    meter = CpuMeter(args.server_pid)
    client = HubClient(
        args.target,
        agent_id,
        token,
        specialization=pb.SPECIALIZATION_NETWORKING,
        skip_history=True,
        send_window=window,
        reconnect_timeout=min(60.0, deadline.left()),
        send_timeout=min(60.0, deadline.left()),
    )
    try:
        await bounded(client.start(), deadline, "the HubClient's welcome")
        work = iter(patterns)

        async def worker() -> None:
            for item in work:
                await client.share_pattern(item)

        meter.start()
        start = time.perf_counter()
        await bounded(
            asyncio.gather(*(worker() for _ in range(window))), deadline, "the last receipt"
        )
        seconds = time.perf_counter() - start
        cpu = meter.stop()
    except HubError as exc:
        raise BenchError(f"HubClient: {type(exc).__name__}: {exc}") from None
    finally:
        await client.close()
    return {"rate": count / seconds, "count": count, "seconds": seconds, "window": window, **cpu}


async def scenario_fanout(args: Context, deadline: Deadline) -> dict[str, Any]:
    """One sender shares `count` patterns as fast as its window allows; `receivers` trainers
    each receive every one. Rate: deliveries per second until the last receiver has all."""
    count = int(args.params["count"])
    receivers = int(args.params["receivers"])
    swarm = await connect_swarm(args, receivers, record_latency=False, deadline=deadline)
    meter = CpuMeter(args.server_pid)
    try:
        swarm.expect(count)
        meter.start()
        start = time.perf_counter()
        for i in range(count):
            await swarm.sender.send(share(f"{args.tag}-f{i}", f"f.{i}"), deadline)
        end = await swarm.all_reached(deadline)
        cpu = meter.stop()
        await swarm.sender.all_answered(deadline)
        if swarm.sender.errors:
            raise BenchError(f"{swarm.sender.errors} shares refused: {swarm.sender.first_error}")
        seconds = end - start
        return {
            "rate": count * receivers / seconds,
            "shares_per_s": count / seconds,
            "events_per_response": swarm.events_per_response(),
            "receivers": receivers,
            "count": count,
            "seconds": seconds,
            **cpu,
        }
    finally:
        await swarm.close()


async def scenario_latency(args: Context, deadline: Deadline) -> dict[str, Any]:
    """`receivers` trainers; first a saturating burst finds the server's max shares/s (unless
    `rates` are given), then one open-loop point per offered load: the sender stamps each
    share with the time it was due and every receiver measures due -> delivery."""
    receivers = int(args.params["receivers"])
    duration = float(args.params["duration"])
    warmup = float(args.params.get("warmup", 0.2))  # fraction of each point not counted
    swarm = await connect_swarm(args, receivers, record_latency=True, deadline=deadline)
    sent = 0
    try:
        max_rate = 0.0
        burst_rates: list[float] = []
        if "rates" in args.params:
            rates = [float(r) for r in args.params["rates"]]
            fractions = [float(f) for f in args.params.get("fractions", [0.0] * len(rates))]
        else:
            # The max: saturating bursts, each timed from when every receiver has its first
            # quarter (the pipeline is full) to when every receiver has it all; the median
            # of `calibrate_rounds` of them (one burst is at the mercy of other work).
            burst = int(args.params["calibrate_count"])
            quarter = burst // 4
            burst_rates = []
            for round_ in range(int(args.params.get("calibrate_rounds", 3))):
                requests = [share(f"{args.tag}-c{round_}.{i}", f"c.{i}") for i in range(burst)]
                swarm.expect(sent + quarter)
                sending = asyncio.create_task(send_all(swarm.sender, requests, deadline, False))
                try:
                    start = await swarm.all_reached(deadline)
                    swarm.expect(sent + burst)
                    end = await swarm.all_reached(deadline)
                    await sending
                finally:
                    sending.cancel()
                sent += burst
                burst_rates.append((burst - quarter) / (end - start))
                await asyncio.sleep(0.2)
            max_rate = median(burst_rates)
            fractions = [float(f) for f in args.params["fractions"]]
            rates = [max_rate * f for f in fractions]
        points = []
        for point, (fraction, rate) in enumerate(zip(fractions, rates, strict=True)):
            n = max(10, round(rate * duration))
            for receiver in swarm.receivers:
                receiver.warmup = int(n * warmup)
            await asyncio.sleep(0.2)  # let the previous point's tail settle
            swarm.expect(sent + n)
            responses = sum(r.responses for r in swarm.receivers)
            meter = CpuMeter(args.server_pid)
            meter.start()
            async for i, due in paced(rate, n):
                await swarm.sender.send(
                    share(f"{args.tag}-p{point}-{i}", timed_id(point, i, due)), deadline
                )
            sent += n
            await swarm.all_reached(deadline)
            cpu = meter.stop()
            samples = [ns for r in swarm.receivers for ns in r.latencies.get(point, [])]
            responses = sum(r.responses for r in swarm.receivers) - responses
            points.append(
                {
                    "fraction": fraction,
                    "offered_shares_per_s": rate,
                    "offered_deliveries_per_s": rate * receivers,
                    "shares": n,
                    "samples": len(samples),
                    "p50_ms": percentile(samples, 50) / 1e6,
                    "p99_ms": percentile(samples, 99) / 1e6,
                    "max_ms": max(samples, default=0) / 1e6,
                    # How many events each stream write carried, this point's alone.
                    "events_per_response": n * receivers / responses if responses else 0.0,
                    **cpu,
                }
            )
        await swarm.sender.all_answered(deadline)
        if swarm.sender.errors:
            raise BenchError(f"{swarm.sender.errors} shares refused: {swarm.sender.first_error}")
        return {
            "receivers": receivers,
            "max_shares_per_s": max_rate,
            "calibration_shares_per_s": burst_rates,
            "points": points,
        }
    finally:
        await swarm.close()


async def scenario_idle(args: Context, deadline: Deadline) -> dict[str, Any]:
    """`trainers` connect (each with its own token, `per_channel` to a channel) and stay idle,
    reading whatever the server sends, until a line arrives on stdin."""
    count = int(args.params["trainers"])
    tokens = args.tokens(count)
    pool = ChannelPool(args.target, int(args.params.get("per_channel", 50)))
    limit = asyncio.Semaphore(int(args.params.get("connect_concurrency", 50)))
    calls: list[Call] = []
    drained = [0]

    async def drain(call: Call) -> None:
        while (response := await call.read()) is not EOF:
            drained[0] += len(response.events)

    async def join(index: int, agent_id: str, token: str) -> None:
        async with limit:
            call = await open_stream(pool.channel(index), agent_id, token, 0, deadline)
        calls.append(call)
        drains.append(asyncio.create_task(drain(call)))

    drains: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        await asyncio.gather(*(join(i, a, t) for i, (a, t) in enumerate(tokens)))
        connect_seconds = time.perf_counter() - start
        emit({"phase": "connected", "trainers": len(calls), "seconds": connect_seconds})
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await bounded(reader.readline(), deadline, "the orchestrator's go-ahead on stdin")
        ended = sum(1 for d in drains if d.done())
        return {
            "trainers": len(calls),
            "connect_seconds": connect_seconds,
            "events_drained": drained[0],
            "streams_ended_early": ended,
        }
    finally:
        for task in drains:
            task.cancel()
        await close_calls(calls)
        await pool.close()


async def scenario_connect(args: Context, deadline: Deadline) -> dict[str, Any]:
    """A connect storm: `trainers` fresh trainers (`resume_after_seq` 0) connect at once and
    each is timed until it is live: its welcome and, with `roster`, the end of its roster.
    With `roster`, also until each knows every other one is online (roster plus joins),
    and how many presence updates that took per trainer."""
    count = int(args.params["trainers"])
    roster = bool(args.params.get("roster", False))
    tokens = args.tokens(count)
    pool = ChannelPool(args.target, int(args.params.get("per_channel", 50)))
    limit = asyncio.Semaphore(int(args.params.get("connect_concurrency", count)))
    calls: list[Call] = []
    welcomed_at: list[float] = []
    live_at: list[float] = []
    # Per trainer, each presence update (serialized: a parsed one holds several times its
    # bytes, and a storm of n trainers is told of n² agents) with when it came.
    timelines: list[tuple[str, list[tuple[float, bytes]]]] = []
    start = time.perf_counter()

    async def join(index: int, agent_id: str, token: str) -> None:
        async with limit:
            call = await open_stream(pool.channel(index), agent_id, token, 0, deadline)
        calls.append(call)
        welcomed_at.append(time.perf_counter())
        if not roster:
            live_at.append(time.perf_counter())
            return
        # Told apart after the storm (`_known_at`): during it, only counted, so that
        # the load's own bookkeeping takes as little as it can of the cores it shares.
        updates: list[tuple[float, bytes]] = []
        told = 0
        while told < count - 1:
            response = await bounded(call.read(), deadline, f"{agent_id}'s presence")
            if response is EOF:
                raise BenchError(f"{agent_id}: the stream ended during the storm")
            if not response.HasField("presence"):
                continue
            now = time.perf_counter()
            presence = response.presence
            updates.append((now, presence.SerializeToString()))
            told += len(presence.online) - len(presence.offline)
            if presence.roster_complete:
                live_at.append(now)
        timelines.append((agent_id, updates))

    try:
        await asyncio.gather(*(join(i, a, t) for i, (a, t) in enumerate(tokens)))
        result: dict[str, Any] = {
            "trainers": len(calls),
            "connect_seconds": max(live_at) - start,
            "welcome_seconds": max(welcomed_at) - start,
        }
        if roster:
            known_at = [_known_at(agent_id, count, updates) for agent_id, updates in timelines]
            result["presence_seconds"] = max(known_at) - start
            told = [len(updates) for _, updates in timelines]
            result["presence_updates_per_trainer"] = sum(told) / len(told)
        return result
    finally:
        await close_calls(calls)
        await pool.close()


def _known_at(agent_id: str, count: int, updates: list[tuple[float, bytes]]) -> float:
    """When the trainer first knew each of the `count - 1` others online, told apart by id
    (a count alone would take an agent told of twice for two)."""
    online: set[str] = set()
    for at, serialized in updates:
        presence = pb.PresenceUpdate.FromString(serialized)
        online.difference_update(presence.offline)
        online.update(a.agent_id for a in presence.online)
        if len(online) >= count - 1:
            return at
    raise BenchError(
        f"{agent_id} was told of {len(online)} distinct agents online, not {count - 1}"
    )


async def scenario_interest(args: Context, deadline: Deadline) -> dict[str, Any]:
    """Interest-filtered fan-out at a fixed rate: `receivers` trainers of the 8
    specializations in turn, each subscribed (with `filtered`) to its own specialization and
    its complements, as the reference trainers are, or (without) to everything; 8 senders,
    one per specialization, share `rate` patterns a second in all for `duration` seconds,
    each specialization in turn, each stamped with the time it was due. Once everyone knows
    everyone is online (the storm's presence is over), timed until every receiver has every
    share it is entitled to: deliveries/s, due -> delivery past the first `warmup` of the
    shares, and the hub's CPU per delivered event."""
    receivers = int(args.params["receivers"])
    rate = float(args.params["rate"])
    count = max(8, round(rate * float(args.params["duration"])))
    warmup = int(count * float(args.params.get("warmup", 0.1)))
    filtered = bool(args.params.get("filtered", False))
    tokens = args.tokens(receivers + 8)
    sending, rest = tokens[:8], tokens[8:]
    sender_ids = {agent_id for agent_id, _ in sending}
    specs = [pb.Specialization.ValueType(1 + k) for k in range(8)]
    pool = ChannelPool(args.target, int(args.params.get("per_channel", 50)))
    tags = [
        tags_of(
            pb.HubEvent(
                sender_id=sending[i % 8][0],
                artifact_shared=pb.Artifact(
                    kind=pb.ARTIFACT_KIND_PATTERN, pattern=pb.Pattern(specialization=specs[i % 8])
                ),
            ),
            specs[i % 8],
        )
        for i in range(count)
    ]
    calls: list[Call] = []
    readers: list[asyncio.Task[float]] = []
    senders: list[Sender] = []
    latencies: list[int] = []  # nanoseconds, every receiver's
    unaware = receivers  # receivers yet to know everyone is online
    all_known = asyncio.Event()
    try:
        head = await head_seq(pool.extra(), sending[0][1], deadline)
        for k, (sender_id, sender_token) in enumerate(sending):
            call = await open_stream(
                pool.extra(), sender_id, sender_token, head, deadline, specs[k]
            )
            calls.append(call)
            senders.append(Sender(call))

        async def receive(call: Call, expected: int) -> float:
            nonlocal unaware
            online: set[str] = set()
            everyone = receivers + 8 - 1
            got = 0
            samples: dict[int, list[int]] = {}
            while got < expected:
                response = await bounded(call.read(), deadline, "a share's delivery")
                if response is EOF:
                    raise BenchError("a receiver's stream ended")
                now = time.perf_counter_ns()
                if response.HasField("presence") and len(online) < everyone:
                    online.difference_update(response.presence.offline)
                    online.update(a.agent_id for a in response.presence.online)
                    if len(online) >= everyone:
                        unaware -= 1
                        if not unaware:
                            all_known.set()
                for event in response.events:
                    if event.sender_id in sender_ids:
                        got += 1
                        pattern_id = event.artifact_shared.pattern.pattern_id
                        record_latency(samples, pattern_id, warmup, now)
            latencies.extend(samples.get(0, []))
            return now / 1e9

        expected_total = 0
        for i, (agent_id, token) in enumerate(rest):
            spec = specs[i % 8]
            wanted = (
                pb.Subscription(specializations=[spec, *complements(spec)])  # type: ignore[list-item]
                if filtered
                else pb.Subscription()
            )
            match = Filter.of(wanted)
            expected = sum(1 for t in tags if match.matches(t))
            expected_total += expected
            call = await open_stream(pool.channel(i), agent_id, token, head, deadline, spec, wanted)
            calls.append(call)
            readers.append(asyncio.create_task(receive(call, expected)))
        # The storm's presence is over before the clock starts.
        await wait_unless_ended(all_known, readers, deadline, "everyone knowing everyone")
        meter = CpuMeter(args.server_pid)
        meter.start()
        start = time.perf_counter()
        async for i, due in paced(rate, count):
            request = share(f"{args.tag}-n{i}", timed_id(0, i, due), specs[i % 8])
            await senders[i % 8].send(request, deadline)
        end = max(await bounded(asyncio.gather(*readers), deadline, "every delivery"))
        cpu = meter.stop()
        for sender in senders:
            await sender.all_answered(deadline)
            sender.close()
        seconds = end - start
        return {
            "filtered": filtered,
            "receivers": receivers,
            "shares": count,
            "offered_shares_per_s": rate,
            "deliveries": expected_total,
            "rate": expected_total / seconds,
            "p50_ms": percentile(latencies, 50) / 1e6,
            "p99_ms": percentile(latencies, 99) / 1e6,
            "samples": len(latencies),
            "hub_cpu_us_per_delivery": cpu["server_cores"] * seconds / expected_total * 1e6,
            "seconds": seconds,
            **cpu,
        }
    finally:
        for task in readers:
            task.cancel()
        await close_calls(calls)
        await pool.close()


async def scenario_replay(args: Context, deadline: Deadline) -> dict[str, Any]:
    """A sender shares `count` patterns while the replayer is away; then the replayer
    reconnects `replays` times from where it left off and is timed until it has them all."""
    count = int(args.params["count"])
    replays = int(args.params.get("replays", 1))
    (sender_id, sender_token), (replayer_id, replayer_token) = args.tokens(2)
    pool = ChannelPool(args.target, 1)
    try:
        channel = pool.extra()
        resume = await head_seq(channel, replayer_token, deadline)
        sender = Sender(await open_stream(channel, sender_id, sender_token, resume, deadline))
        requests = [share(f"{args.tag}-r{i}", f"r.{i}") for i in range(count)]
        seed_seconds, seed_progress = await send_all(sender, requests, deadline)
        sender.close()
        if sender.errors:
            raise BenchError(f"{sender.errors} shares refused: {sender.first_error}")
        runs = []
        for _ in range(replays):
            await asyncio.sleep(0.3)  # let the previous session's goodbye commit
            replay_channel = pool.extra()
            meter = CpuMeter(args.server_pid)
            meter.start()
            start = time.perf_counter()
            call = await open_stream(replay_channel, replayer_id, replayer_token, resume, deadline)
            receiver = Receiver(call, sender_id)
            receiver.expect(count)
            end = await receiver.reached(deadline)
            seconds = end - start
            events = receiver.got + receiver.other_events
            runs.append(
                {"rate": events / seconds, "events": events, "seconds": seconds, **meter.stop()}
            )
            receiver.task.cancel()
            call.cancel()
        return {
            "rate": median([r["rate"] for r in runs]),
            "runs": runs,
            "count": count,
            "seed_shares_per_s": count / seed_seconds,
            "seed_rate_by_tenth": seed_progress,
        }
    finally:
        await pool.close()


SCENARIOS: dict[str, Callable[[Context, Deadline], Awaitable[dict[str, Any]]]] = {
    "ingest": scenario_ingest,
    "ingest_client": scenario_ingest_client,
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "idle": scenario_idle,
    "connect": scenario_connect,
    "interest": scenario_interest,
    "replay": scenario_replay,
}


def emit(payload: dict[str, Any]) -> None:
    print(json.dumps(payload), flush=True)


async def _main(args: argparse.Namespace) -> int:
    context = Context(
        target=args.target,
        params=json.loads(args.params),
        server_pid=args.server_pid,
        token_file=args.tokens,
    )
    deadline = Deadline(args.deadline)
    try:
        result = await asyncio.wait_for(
            SCENARIOS[args.scenario](context, deadline), args.deadline + 5
        )
    except (BenchError, TimeoutError, grpc.aio.AioRpcError) as exc:
        message = (
            f"{exc.code().name}: {exc.details()}"
            if isinstance(exc, grpc.aio.AioRpcError)
            else str(exc) or type(exc).__name__
        )
        emit({"scenario": args.scenario, "error": message})
        return 2
    emit({"scenario": args.scenario, "result": result})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernelhub_bench.load", description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--target", required=True, help="127.0.0.1:PORT")
    parser.add_argument("--tokens", type=Path, help="'agent token' lines (none: placeholders)")
    parser.add_argument("--server-pid", type=int, help="to measure the server's CPU")
    parser.add_argument("--params", default="{}", help="the scenario's sizes, as JSON")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for everything")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

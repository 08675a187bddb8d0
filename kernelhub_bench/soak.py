"""`kernelhub-bench soak`: many trainers for a long time, optionally through hub crashes.

Prints the hub's RSS over time, then counts, for every trainer, the events it should have
received and did not (lost) and the ones it received twice (duplicated): both must be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.sdk.client import HubClient
from trainer_service.sdk.errors import HubError

from .common import LOOPBACK, pattern, read_tokens
from .runner import HUB_READY, Child, child_env, hub_argv, issue_tokens


@dataclass
class SoakResult:
    trainers: int
    duration_seconds: float
    shares_per_second_per_trainer: float
    hub_restarts: int
    shared: int
    delivered: int
    lost: int
    duplicated: int
    send_errors: int
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.send_errors == 0


class _Trainer:
    def __init__(self, client: HubClient) -> None:
        self.client = client
        self.shared: list[str] = []  # artifact ids it got receipts for
        self.seqs: list[int] = []
        self.received: set[str] = set()
        self.errors = 0

    async def share_until(self, stop: asyncio.Event, rate: float, rng: random.Random) -> None:
        i = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                # Exponential gaps: a Poisson stream of shares at `rate` per second.
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
            if stop.is_set():
                return
            shared = pattern(f"{self.client.agent_id}-{i}", "soak_pattern")
            i += 1
            try:
                self.shared.append((await self.client.share_pattern(shared)).resource_id)
            except HubError:
                self.errors += 1

    async def consume(self) -> None:
        async for item in self.client.events():
            if isinstance(item, pb.HubEvent):
                self.seqs.append(item.seq)
                if item.HasField("artifact_shared"):
                    self.received.add(item.artifact_shared.artifact_id)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


async def soak(
    trainers: int,
    duration: float,
    rate: float,
    restart_every: float | None,
    sample_every: float,
    drain_timeout: float = 120.0,
    log: Callable[[str], None] = print,
) -> SoakResult:
    with tempfile.TemporaryDirectory(prefix="kernelhub-soak-") as tmp:
        workdir = Path(tmp)
        env = child_env()
        db, tokens_file, port = workdir / "soak.db", workdir / "tokens", _free_port()
        agents = [f"soak_{i:04d}" for i in range(trainers)]
        await issue_tokens(db, agents, tokens_file, env)
        argv = hub_argv(db, port)
        restarts = 0
        hub = Child("hub-0", argv, workdir, env)
        await hub.start()
        await hub.wait_for_line(HUB_READY, 60)
        members = [
            _Trainer(
                HubClient(
                    f"{LOOPBACK}:{port}",
                    agent,
                    token,
                    specialization=pb.SPECIALIZATION_NETWORKING,
                    backoff_base=0.1,
                    backoff_cap=2.0,
                    reconnect_timeout=120,
                    inbound_buffer=4096,
                )
            )
            for agent, token in read_tokens(tokens_file)
        ]
        result = SoakResult(trainers, duration, rate, 0, 0, 0, 0, 0, 0)
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:
            for member in members:
                await member.client.start()
            rng = random.Random(7)
            tasks = [asyncio.create_task(m.consume()) for m in members]
            senders = [
                asyncio.create_task(m.share_until(stop, rate, random.Random(rng.random())))
                for m in members
            ]
            start = time.monotonic()
            next_restart = start + restart_every if restart_every else None
            # The first sample is taken at once and the last when the run ends, so even a
            # run whose restarts ate its sampling interval reports RSS at both ends.
            result.rss_mib.append((0.0, round(_rss_mib(hub.pid), 1)))
            while (elapsed := time.monotonic() - start) < duration:
                await asyncio.sleep(min(sample_every, duration - elapsed))
                elapsed = time.monotonic() - start
                rss = _rss_mib(hub.pid)
                result.rss_mib.append((round(elapsed, 1), round(rss, 1)))
                shared = sum(len(m.shared) for m in members)
                delivered = sum(len(m.seqs) for m in members)
                log(
                    f"t={elapsed:6.0f}s  hub rss={rss:7.1f} MiB  shared={shared:8d}  delivered={delivered:10d}  restarts={restarts}"
                )
                if next_restart is not None and time.monotonic() >= next_restart:
                    await hub.stop(signal.SIGKILL)
                    restarts += 1
                    hub = Child(f"hub-{restarts}", argv, workdir, env)
                    await hub.start()
                    await hub.wait_for_line(HUB_READY, 60)
                    next_restart = time.monotonic() + (restart_every or 0)
            # And once more at the end: the loop's last step may have been a restart.
            result.rss_mib.append((round(time.monotonic() - start, 1), round(_rss_mib(hub.pid), 1)))
            stop.set()
            await asyncio.wait_for(asyncio.gather(*senders), drain_timeout)

            # Drain: every trainer should end up with every artifact the others got receipts for.
            everything = {a: m.client.agent_id for m in members for a in m.shared}
            deadline = time.monotonic() + drain_timeout
            while time.monotonic() < deadline:
                missing = sum(
                    1
                    for m in members
                    for a, owner in everything.items()
                    if owner != m.client.agent_id and a not in m.received
                )
                if missing == 0:
                    break
                await asyncio.sleep(0.5)
            result.hub_restarts = restarts
            result.shared = len(everything)
            result.delivered = sum(len(m.seqs) for m in members)
            result.lost = sum(
                1
                for m in members
                for a, owner in everything.items()
                if owner != m.client.agent_id and a not in m.received
            )
            result.duplicated = sum(len(m.seqs) - len(set(m.seqs)) for m in members)
            result.send_errors = sum(m.errors for m in members)
            return result
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            for member in members:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(member.client.close(), 10)
            await hub.stop()


def report(result: SoakResult) -> str:
    verdict = "OK" if result.ok else "FAILED"
    return (
        f"soak {verdict}: {result.trainers} trainers, {result.duration_seconds:g}s, "
        f"{result.hub_restarts} hub restarts; shared {result.shared}, delivered {result.delivered}; "
        f"lost {result.lost}, duplicated {result.duplicated}, send errors {result.send_errors}; "
        f"hub RSS {min(r for _, r in result.rss_mib or [(0, 0)]):.0f}-{max(r for _, r in result.rss_mib or [(0, 0)]):.0f} MiB"
    )


def as_json(result: SoakResult) -> dict[str, Any]:
    return {**asdict(result), "ok": result.ok}


def _rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20

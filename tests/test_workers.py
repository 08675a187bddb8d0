"""`kernelhub-hub serve --workers N`: N replica processes on one port and one PostgreSQL
database, supervised by their parent (hub_service/workers.py). Each test has a fresh database
(`replica_url`) and runs the real command as a process; which worker carries a stream is read
from that worker's own `/metrics` (worker i serves its own metrics port)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import workers
from hub_service.config import HubConfig
from hub_service.testing import HubStartError, TestHub

from .conftest import RawTrainer, async_stub, auth, hello, pattern
from .test_metrics import scrape, value
from .test_replicas import _conninfo, ended_with, log_seqs, replica_url, wait_for

__all__ = ["replica_url"]  # the fixture, imported for the tests here

pytestmark = pytest.mark.timeout(120)

WORKER_ARGS = (
    "--metrics-port",
    "0",
    "--replica-catch-up-interval",
    "0.2",
    "--training-sync-interval",
    "0",
)
# The supervisor's line for each worker that serves (it logs at INFO).
_SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving on \S+; metrics on :(\d+)/metrics")
AGENTS = [f"AI_Node_{i}" for i in range(40)]


@dataclass(frozen=True)
class Worker:
    index: int
    pid: int
    metrics_port: int


def serving_workers(hub: TestHub) -> dict[int, Worker]:
    """Each worker as the supervisor last said it serves (a restarted one: its new pid)."""
    found: dict[int, Worker] = {}
    for match in _SERVING.finditer(hub.stderr()):
        index, pid, port = (int(g) for g in match.groups())
        found[index] = Worker(index, pid, port)
    return found


async def eventually(what: str, check: object, timeout: float = 30.0) -> None:
    """Polls `check()` (a callable, sync or not) until true, or fails saying `what`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = check()  # type: ignore[operator]
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            pytest.fail(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.05)


@dataclass
class Running:
    hub: TestHub  # the supervisor's process; its stderr has the workers' lines
    tokens: dict[str, str]  # agent id -> its bearer token


@contextlib.asynccontextmanager
async def workers_hub(
    url: str, count: int = 2, *extra: str, agents: Sequence[str] = AGENTS
) -> AsyncIterator[Running]:
    """`serve --workers count` on `url`, and tokens for `agents` (issued while it starts)."""
    hub = TestHub.subprocess(
        url,
        args=["--workers", str(count), *WORKER_ARGS, *extra],
        env={"KERNELHUB_LOG_LEVEL": "INFO"},
        name="workers",
    )
    try:
        issuing = [asyncio.ensure_future(hub.issue_tokens(*agents))] if agents else []
        await asyncio.gather(*issuing, hub.start())
        # The startup line comes once every worker said it serves.
        assert len(serving_workers(hub)) == count, hub.stderr()[-3000:]
        yield Running(hub, issuing[0].result() if issuing else {})
    finally:
        await hub.stop()  # drained: no worker of this test still runs when the next starts
        await hub.close()


async def connections(worker: Worker) -> int:
    samples = await asyncio.to_thread(scrape, worker.metrics_port)
    return int(value(samples, "kernelhub_connections"))


@dataclass
class Placed:
    """A trainer on its own channel (its own TCP connection), and the worker carrying it."""

    trainer: RawTrainer
    channel: grpc.aio.Channel
    worker: int


async def connect_fresh(hub: TestHub, agent_id: str, token: str) -> tuple[RawTrainer, Any]:
    # Its own subchannel: a new TCP connection, which the kernel gives to either worker.
    channel = grpc.aio.insecure_channel(hub.target, options=[("grpc.use_local_subchannel_pool", 1)])
    call = async_stub(channel).Connect(metadata=auth(token))
    await call.write(pb.ConnectRequest(message_id="hello", hello=hello(agent_id)))
    return await RawTrainer.welcomed(agent_id, call), channel


async def place(hub: TestHub, tokens: dict[str, str], per_worker: int) -> list[Placed]:
    """Trainers (`tokens`' agents, in turn) on fresh connections until every worker carries
    `per_worker` of them; which one took each is read from the workers' `kernelhub_connections`
    gauges."""
    running = sorted(serving_workers(hub).values(), key=lambda w: w.index)
    placed: list[Placed] = []
    counts = [await connections(w) for w in running]
    for agent_id, token in tokens.items():
        if all(sum(p.worker == w.index for p in placed) >= per_worker for w in running):
            return placed
        trainer, channel = await connect_fresh(hub, agent_id, token)
        now = [await connections(w) for w in running]
        grew = [w.index for w, a, b in zip(running, counts, now, strict=True) if b == a + 1]
        assert len(grew) == 1 and sum(now) == sum(counts) + 1, (counts, now)
        counts = now
        placed.append(Placed(trainer, channel, grew[0]))
    pytest.fail(
        f"{len(tokens)} connections and not {per_worker} on each worker: "
        f"{[p.worker for p in placed]}"
    )


async def close_all(placed: list[Placed]) -> None:
    for p in placed:
        p.trainer.call.cancel()
        await p.channel.close(None)


async def share(trainer: RawTrainer, name: str) -> pb.Receipt:
    return await trainer.receipt(
        await trainer.send(share_pattern=pb.SharePattern(pattern=pattern(name)))
    )


async def test_two_workers_share_one_port_and_each_delivers_the_others_shares(
    replica_url: str,
) -> None:
    async with workers_hub(replica_url) as running:
        hub, tokens = running.hub, running.tokens
        pids = {w.pid for w in serving_workers(hub).values()}
        assert len(pids) == 2
        assert hub.pid not in pids  # the parent serves nothing
        placed = await place(hub, tokens, per_worker=2)
        try:
            on = {i: [p.trainer for p in placed if p.worker == i] for i in (0, 1)}
            # A share through each worker reaches every trainer, on either worker.
            receipts = [await share(on[0][0], "from-worker-0"), await share(on[1][0], "from-1")]
            for p in placed:
                mine = {r.seq for r in receipts if r.message_id in p.trainer.receipts}
                await wait_for(p.trainer, {r.seq for r in receipts} - mine)
            assert len(await log_seqs(_conninfo(replica_url))) >= 2
        finally:
            await close_all(placed)


async def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(replica_url: str) -> None:
    async with workers_hub(replica_url) as running:
        hub, tokens = running.hub, running.tokens
        victim = serving_workers(hub)[1]
        os.kill(victim.pid, signal.SIGKILL)
        await eventually(
            "the supervisor reaps the killed worker",
            lambda: (
                f"worker 1 (pid {victim.pid}) was killed by SIGKILL; restarting" in hub.stderr()
            ),
        )
        # Meanwhile worker 0 alone takes every new connection on the port.
        alone = [await connect_fresh(hub, agent_id, tokens[agent_id]) for agent_id in AGENTS[:4]]
        await eventually(
            "worker 1 serves again, a new process",
            lambda: serving_workers(hub)[1].pid != victim.pid,
        )
        assert psutil.Process(hub.pid).is_running()  # the parent carried on
        reborn = serving_workers(hub)[1]
        placed = await place(hub, {a: tokens[a] for a in AGENTS[4:]}, per_worker=1)
        try:
            assert any(p.worker == 1 for p in placed)
            assert await connections(reborn) >= 1  # the new worker 1 carries a stream
            # And it delivers what the other worker committed.
            on0 = next(p.trainer for p in placed if p.worker == 0)
            on1 = next(p.trainer for p in placed if p.worker == 1)
            receipt = await share(on0, "after-the-restart")
            await wait_for(on1, {receipt.seq})
        finally:
            await close_all(placed)
            for trainer, channel in alone:
                trainer.call.cancel()
                await channel.close(None)


async def test_sigterm_drains_every_worker_and_loses_no_receipted_message(
    replica_url: str,
) -> None:
    async with workers_hub(replica_url) as running:
        hub, tokens = running.hub, running.tokens
        placed = await place(hub, tokens, per_worker=1)
        senders = [next(p for p in placed if p.worker == i) for i in (0, 1)]
        sent = {
            p.trainer.agent_id: [
                await p.trainer.send(share_pattern=pb.SharePattern(pattern=pattern(f"{i}-{n}")))
                for n in range(200)
            ]
            for i, p in enumerate(senders)
        }
        for p in senders:  # each worker is reading; now stop them all mid-stream
            await p.trainer.receipt(sent[p.trainer.agent_id][0])
        ended = [asyncio.ensure_future(ended_with(p.trainer)) for p in placed]
        assert await hub.terminate() == 0, hub.stderr()[-3000:]
        assert "every worker drained" in hub.stderr()
        codes = await asyncio.gather(*ended)
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
        stored = set(await log_seqs(_conninfo(replica_url)))
        for p in senders:
            receipts = [r for m, r in p.trainer.receipts.items() if m in sent[p.trainer.agent_id]]
            assert receipts, f"{p.trainer.agent_id}: nothing was acknowledged"
            missing = {r.seq for r in receipts} - stored
            assert not missing, f"receipted but not in the log: {sorted(missing)[:10]}"
        await close_all(placed)
        for worker in serving_workers(hub).values():
            assert not psutil.pid_exists(worker.pid), f"worker {worker.index} outlived the parent"


@pytest.mark.parametrize("database", ["sqlite", "memory://"])
async def test_workers_are_refused_without_postgresql(database: str, tmp_path: Path) -> None:
    where = (
        ["--db", str(tmp_path / "hub.db")] if database == "sqlite" else ["--database-url", database]
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        "serve",
        "--workers",
        "2",
        "--port",
        "0",
        *where,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 2
    assert "--workers 2 needs PostgreSQL" in err.decode(), err.decode()
    assert b"serving" not in out
    assert not (tmp_path / "hub.db").exists()  # refused before anything was opened


def test_a_held_port_is_not_reserved_again() -> None:
    # Another supervisor's reservation, or a gRPC server with its default options (which
    # binds with SO_REUSEPORT): a second reservation would share the port, not take it.
    with workers._reserve("127.0.0.1", 0) as held:
        with pytest.raises(OSError) as refused:
            workers._reserve("127.0.0.1", held.getsockname()[1]).close()
        assert refused.value.errno == errno.EADDRINUSE
    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(OSError) as refused:
            workers._reserve("127.0.0.1", port).close()
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        server.stop(None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::1", "127.0.0.1"])
def test_a_wildcard_reservation_holds_the_port_on_both_families(host: str) -> None:
    # gRPC binds a wildcard host dual-stack on [::]: the reservation must hold [::1] too.
    with workers._reserve("0.0.0.0", 0) as held:
        port = held.getsockname()[1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as plain, pytest.raises(OSError) as refused:
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            plain.bind((host, port))
        assert refused.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
async def test_a_plain_hub_cannot_take_a_reserved_port(host: str, tmp_path: Path) -> None:
    # The reservation alone, as it stands while every worker restarts.
    with workers._reserve("0.0.0.0", 0) as held:
        port = held.getsockname()[1]
        plain = TestHub.subprocess(
            tmp_path / "plain.db", port=port, args=["--host", host], name="plain"
        )
        try:
            with pytest.raises(HubStartError, match="exited"):
                await plain.start()
            assert "could not start" in plain.stderr()
        finally:
            await plain.close()


async def test_a_second_supervisor_cannot_take_the_workers_port(replica_url: str) -> None:
    async with workers_hub(replica_url, agents=()) as running:
        second = TestHub.subprocess(
            replica_url, port=running.hub.port, args=["--workers", "2"], name="second"
        )
        try:
            with pytest.raises(HubStartError, match=r"exited \(1\)"):
                await second.start()
            assert "could not start" in second.stderr()
            assert "Address already in use" in second.stderr()
        finally:
            await second.close()


async def test_a_crash_loop_makes_the_supervisor_give_up(replica_url: str) -> None:
    # Worker 0's metrics port is taken: each of its starts fails, as a broken deploy would.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = TestHub.subprocess(
            replica_url,
            args=["--workers", "2", "--metrics-port", str(port), "--worker-max-restarts", "1"],
            env={"KERNELHUB_LOG_LEVEL": "INFO"},
            name="crashing",
        )
        try:
            with pytest.raises(HubStartError, match=r"exited \(1\)"):
                await hub.start()
            err = hub.stderr()
            assert re.search(
                r"worker \d \(pid \d+\) exited with code 1; restarting it in 0.5s", err
            )
            assert re.search(r"worker \d \(pid \d+\) exited with code 1, its death number 2", err)
            assert "giving up, stopping the other workers" in err
            assert "kernelhub serving on" not in hub.stdout_path.read_text()
        finally:
            await hub.close()


async def test_workers_drain_when_their_parent_dies(replica_url: str) -> None:
    async with workers_hub(replica_url, agents=()) as started:
        hub = started.hub
        running = [psutil.Process(w.pid) for w in serving_workers(hub).values()]
        await hub.kill()  # SIGKILL to the parent: no signal is forwarded
        _gone, alive = await asyncio.to_thread(psutil.wait_procs, running, 30)
        try:
            assert not alive, f"workers still serving without a supervisor: {alive}"
        finally:
            for worker in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()


@contextlib.contextmanager
def supervisor(config: HubConfig) -> Iterator[tuple[workers.Supervisor, Future[int]]]:
    """The supervisor itself, in a thread of this process (its workers are real processes);
    its run()'s outcome. A signal byte ends it if it still runs at the end."""
    receive, send = socket.socketpair()
    running = workers.Supervisor(config, "INFO", receive)
    pool = ThreadPoolExecutor(1)
    try:
        yield running, pool.submit(running.run)
    finally:
        send.send(bytes([signal.SIGTERM]))
        pool.shutdown(wait=True)
        receive.close()
        send.close()


def test_a_worker_that_never_serves_is_given_up_on(
    replica_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Deaths never meet in the window, as a worker killed START_TIMEOUT after each start:
    # only its starts in a row that never served can end the loop.
    monkeypatch.setattr(workers, "RESTART_WINDOW", 0.01)
    caplog.set_level(logging.INFO, logger="hub_service.workers")
    with socket.socket() as taken:  # its metrics port: each start fails
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = HubConfig(
            database_url=replica_url,
            workers=1,
            worker_max_restarts=1,
            metrics_port=taken.getsockname()[1],
        )
        with supervisor(config) as (_, outcome):
            assert outcome.result(timeout=60) == 1
    assert "its start number 2 in a row that never served" in caplog.text


def test_a_killed_worker_is_not_killed_again_while_it_is_reaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = workers.Supervisor(
        HubConfig(database_url="postgresql+psycopg://unused/x", workers=1),
        "INFO",
        socket.socket(),
    )
    stuck = workers._SPAWN.Process(target=time.sleep, args=(60,))
    stuck.start()
    try:
        (worker,) = running.workers
        worker.process, worker.started = stuck, time.monotonic() - workers.START_TIMEOUT - 1
        assert not running._tend(set())  # overdue: killed
        now = time.monotonic()
        # Not reaped yet, as a process in D state stays: no deadline now (a spinning loop),
        # and no second kill.
        assert running._next_deadline(now) > now
        assert not running._tend(set())
        assert caplog.text.count("killing it") == 1
    finally:
        stuck.kill()
        stuck.join(10)
        running.wakeup.close()


def _free_port_below_taken() -> tuple[int, socket.socket]:
    """A port that was free a moment ago, and a listening socket on the port above it.

    The free one comes from bind(0), not from below a port bind(0) gave: Linux gives bind(0)
    odd ports and outgoing connections even ones, so the port below an odd one is where
    the workers' own database connections land (the cause of a flaky failure here)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", base + 1))
        except OSError:
            taken.close()
            continue
        taken.listen()
        return base, taken
    raise AssertionError("no free port with a free one above it in 100 tries")


def test_an_error_after_the_start_stops_every_worker(
    replica_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Worker 1 cannot start (its metrics port is taken); spawning its restart fails.
    base, taken = _free_port_below_taken()
    with taken:
        config = HubConfig(
            database_url=replica_url,
            workers=2,
            host="127.0.0.1",
            metrics_port=base,
            replica_catch_up_interval=0.2,
        )
        with supervisor(config) as (running, outcome):
            start = running._start
            started: list[int] = []

            def flaky_start(worker: workers.Worker) -> None:
                if worker.index == 1 and started.count(1):
                    raise OSError(errno.EAGAIN, "no process to spawn")
                started.append(worker.index)
                start(worker)

            monkeypatch.setattr(running, "_start", flaky_start)
            with pytest.raises(OSError, match="no process to spawn"):
                outcome.result(timeout=60)
            first = running.workers[0]
            assert first.process is not None
            assert not first.process.is_alive(), "worker 0 outlived its supervisor"

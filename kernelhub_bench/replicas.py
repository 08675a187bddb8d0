"""`kernelhub-bench replicas`: aggregate ingest and fan-out of 1, 2, 3... hub replicas on one
PostgreSQL database, and what the database pays per committed event (CPU, WAL bytes).

Each replica count gets a fresh database and its own replicas (`--replica`); a count of 0 is
one hub without `--replica` (today's PostgreSQL hub: no lock, fed by its own commits). Senders
and receivers are spread round-robin over the replicas, so most deliveries cross replicas (a
receiver on A gets B's shares through the shared log). The first count's figures are the
baseline of the same run: the ratios are what replica mode and adding replicas changed here.
The load runs in this process; on a small machine it competes with the hubs and PostgreSQL
for the same cores, and the report says how busy each was.

With `--workers 1,2`, each count N is one `kernelhub-hub serve --workers N` instead (N = 1: one
plain process, the baseline), on its one address, every stream on a TCP connection of its own
(the kernel spreads connections, not streams, over the workers); the report says how many
streams each worker carried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import psycopg
from sqlalchemy import make_url

from hub_service.testing import TestHub

from .common import EOF, Call, make_channel, share
from .load import BenchError, Deadline, Sender, open_stream, send_all

STEP_SECONDS = 300.0  # one replica count's whole measurement


@dataclass
class ReplicaFigures:
    replicas: int  # 0: one hub without --replica
    workers: int  # 0: replicas on their own ports; N: one `serve --workers N`
    senders: int
    receivers: int
    shares: int
    ingest_per_s: float  # shares committed per second, all senders together
    deliveries_per_s: float  # shares x receivers per second, until the last receiver has all
    hub_cpu_ms_per_event: float  # every replica process and its writer
    db_cpu_ms_per_event: float  # every PostgreSQL process
    wal_bytes_per_event: float
    load_cores: float  # what this process (the load) used meanwhile
    streams_per_worker: list[int]  # with workers: each worker's connections on the port


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new database on the server `admin_url` names, dropped afterwards; its URL."""
    name = f"kh_bench_{uuid.uuid4().hex[:10]}"
    admin = _libpq(admin_url)
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as db:
        await db.execute(f"CREATE DATABASE {name}")
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as db:
            await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _postgres_processes() -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("postgres")
    ]


def _hub_processes(hubs: list[TestHub]) -> list[psutil.Process]:
    found = []
    for hub in hubs:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(hub.pid)
            found += [process, *process.children(recursive=True)]
    return found


def _streams_per_worker(hub: TestHub) -> list[int]:
    """Each worker's established connections on the hub's port (the workers are the
    supervisor's children; their writer processes are theirs)."""
    counts = []
    for child in psutil.Process(hub.pid).children():
        with contextlib.suppress(psutil.Error):
            on_port = [c for c in child.net_connections(kind="tcp") if c.laddr[1] == hub.port]
            if any(c.status == psutil.CONN_LISTEN for c in on_port):  # a worker
                counts.append(sum(c.status == psutil.CONN_ESTABLISHED for c in on_port))
    return sorted(counts, reverse=True)


class Counter:
    """A receiver: counts the shares that reach it, until it has `want`."""

    def __init__(self, call: Call, want: int) -> None:
        self.call = call
        self.want = want
        self.got = 0
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.got < self.want:
            response = await self.call.read()
            if response is EOF:
                raise BenchError("a receiver's stream ended")
            self.got += sum(1 for e in response.events if e.HasField("artifact_shared"))
        self.done.set()


async def measure(
    admin_url: str, replicas: int, senders: int, receivers: int, shares: int, workers: int = 0
) -> ReplicaFigures:
    """One replica count (0: one plain hub), or with `workers` one `serve --workers N`: fresh
    database, hubs, load, figures."""
    plain = replicas == 0 or workers == 1
    replicas = 1 if workers else max(1, replicas)
    deadline = Deadline(STEP_SECONDS)
    async with fresh_database(admin_url) as url:
        hubs = [
            TestHub.subprocess(
                url,
                args=[
                    *(() if plain or workers else ("--replica", "true")),
                    *(("--workers", str(workers)) if workers > 1 else ()),
                    "--training-sync-interval",
                    "0",
                ],
                env={"KERNELHUB_LOG_LEVEL": "WARNING"},
                name=f"replica{i}",
            )
            for i in range(replicas)
        ]
        channels: list[Any] = []
        try:
            agents = [f"bench_s{i}" for i in range(senders)] + [
                f"bench_r{i}" for i in range(receivers)
            ]
            # Tokens go straight to the database (the CLI), while the replicas start.
            issued = asyncio.ensure_future(hubs[0].issue_tokens(*agents))
            await asyncio.gather(issued, *(h.start() for h in hubs))
            tokens = issued.result()
            channels = [make_channel(h.target) for h in hubs]

            def channel(index: int) -> Any:
                if workers:  # a connection per stream: the kernel balances connections
                    channels.append(make_channel(hubs[0].target))
                    return channels[-1]
                return channels[index % replicas]

            total = senders * shares
            counters = [
                Counter(
                    await open_stream(
                        channel(i), f"bench_r{i}", tokens[f"bench_r{i}"], 0, deadline
                    ),
                    total,
                )
                for i in range(receivers)
            ]
            streams = [
                Sender(
                    await open_stream(channel(i), f"bench_s{i}", tokens[f"bench_s{i}"], 0, deadline)
                )
                for i in range(senders)
            ]
            tag = uuid.uuid4().hex[:8]
            batches = [
                [share(f"{tag}-{s}-{i}", f"p.{s}.{i}") for i in range(shares)]
                for s in range(senders)
            ]
            async with await psycopg.AsyncConnection.connect(_libpq(url), autocommit=True) as db:
                lsn = (await (await db.execute("SELECT pg_current_wal_lsn()")).fetchone() or [""])[
                    0
                ]
                postgres = _postgres_processes()
                hub_processes = _hub_processes(hubs)
                db_cpu, hub_cpu = _cpu_seconds(postgres), _cpu_seconds(hub_processes)
                load = psutil.Process()
                load_cpu = _cpu_seconds([load])
                start = time.perf_counter()
                await asyncio.gather(
                    *(
                        send_all(s, b, deadline, tenths=False)
                        for s, b in zip(streams, batches, strict=True)
                    )
                )
                ingest = time.perf_counter() - start
                for counter in counters:
                    waiter = asyncio.ensure_future(counter.done.wait())
                    await asyncio.wait(
                        {waiter, counter.task},
                        timeout=deadline.left(),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    waiter.cancel()
                    if not counter.done.is_set():
                        raise BenchError(f"a receiver got {counter.got} of {total} shares")
                fanout = time.perf_counter() - start
                db_cpu = _cpu_seconds(postgres) - db_cpu
                hub_cpu = _cpu_seconds(hub_processes) - hub_cpu
                load_cpu = _cpu_seconds([load]) - load_cpu
                wal = (
                    await (
                        await db.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,))
                    ).fetchone()
                    or [0]
                )[0]
            spread = _streams_per_worker(hubs[0]) if workers > 1 else []
            errors = sum(s.errors for s in streams)
            if errors:
                raise BenchError(f"{errors} shares refused; first: {streams[0].first_error}")
            for s in streams:
                s.close()
            for counter in counters:
                counter.task.cancel()
                counter.call.cancel()
            return ReplicaFigures(
                replicas=0 if plain else replicas,
                workers=workers,
                senders=senders,
                receivers=receivers,
                shares=total,
                ingest_per_s=total / ingest,
                deliveries_per_s=total * receivers / fanout,
                hub_cpu_ms_per_event=1000 * hub_cpu / total,
                db_cpu_ms_per_event=1000 * db_cpu / total,
                wal_bytes_per_event=float(wal) / total,
                load_cores=load_cpu / fanout,
                streams_per_worker=spread,
            )
        finally:
            for c in channels:
                with contextlib.suppress(Exception):
                    await c.close(None)
            for h in hubs:
                await h.close()


async def run_replicas(
    admin_url: str,
    counts: list[int],
    senders: int,
    receivers: int,
    shares: int,
    workers: bool = False,
) -> list[dict[str, Any]]:
    """Every replica count (with `workers`: worker count) in turn; each row also carries its
    ratios to the first count's."""
    rows: list[dict[str, Any]] = []
    for count in counts:
        figures = asdict(
            await measure(
                admin_url,
                0 if workers else count,
                senders,
                receivers,
                shares,
                workers=count if workers else 0,
            )
        )
        base = rows[0] if rows else figures
        figures["ingest_ratio"] = figures["ingest_per_s"] / base["ingest_per_s"]
        figures["deliveries_ratio"] = figures["deliveries_per_s"] / base["deliveries_per_s"]
        rows.append(figures)
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    workers = any(r["workers"] for r in rows)
    lines = [
        f"{'workers' if workers else 'replicas':>8}  ingest/s  (x)    deliveries/s  (x)    "
        "hub ms/ev  db ms/ev  WAL B/ev  load cores" + ("  streams per worker" if workers else ""),
    ]
    for r in rows:
        label = r["workers"] if workers else r["replicas"] or "plain"
        spread = "  " + "/".join(map(str, r["streams_per_worker"])) if workers else ""
        lines.append(
            f"{label:>8}  {r['ingest_per_s']:>8.0f}  {r['ingest_ratio']:>4.2f}  "
            f"{r['deliveries_per_s']:>12.0f}  {r['deliveries_ratio']:>4.2f}  "
            f"{r['hub_cpu_ms_per_event']:>9.3f}  {r['db_cpu_ms_per_event']:>8.3f}  "
            f"{r['wal_bytes_per_event']:>8.0f}  {r['load_cores']:>10.2f}{spread}"
        )
    return "\n".join(lines)

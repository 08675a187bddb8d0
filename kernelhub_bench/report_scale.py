"""`kernelhub-bench report-scale`: the run report's read side on synthetic SQLite databases of
N rows and of N/10, made in the same run: its time and its peak memory at each size, as
ratios, beside a baseline (one plain scan of the artifact table's times with sqlite3).

Time should grow with the rows (ratio near 10), memory should not (ratio near 1): the
numbers are aggregated in SQL or streamed, never held whole.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, Table, insert
from sqlmodel import SQLModel

from hub_service import schema
from hub_service.models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
)
from hub_service.report import read
from hub_service.report_data import ENDED, Window
from hub_service.sql_write import make_engine

AGENTS = 1000
SPECIALIZATIONS = 8  # the contract's, 1..8
SPAN_SECONDS = 3600.0
CHUNK = 20_000  # rows per executemany


@dataclass
class Measured:
    rows: int
    seconds: float
    peak_bytes: int
    baseline_seconds: float


def _insert(
    connection: Connection,
    table: Table,
    numbers: range,
    make: Callable[[int], dict[str, object]],
) -> None:
    """Rows `make(n)` for each n, a chunk at a time (never all of them in memory)."""
    for first in range(numbers.start, numbers.stop, CHUNK):
        chunk = range(first, min(first + CHUNK, numbers.stop))
        connection.execute(insert(table), [make(n) for n in chunk])


def synthesize(database_url: str, rows: int, seed: int = 7) -> None:
    """A hub database (this hub's schema, on any database the hub serves) holding `rows`
    rows: half artifacts, a quarter ended collaborations, an eighth feature requests and as
    many deliveries, made over an hour."""
    engine = make_engine(database_url)
    try:
        schema.upgrade(engine)
        with engine.begin() as connection:
            _fill(connection, rows, random.Random(seed))
    finally:
        engine.dispose()


def _fill(connection: Connection, rows: int, rng: random.Random) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def at(offset: float) -> datetime:
        return start + timedelta(seconds=offset)

    agents = [f"AI_Node_{i}" for i in range(AGENTS)]
    artifacts, collaborations, requests = rows // 2, rows // 4, rows // 8

    def collaboration(n: int) -> dict[str, object]:
        begun = rng.random() * SPAN_SECONDS
        initiator, target = rng.sample(agents, 2)
        return {
            "session_id": f"collab_{n}",
            "initiator_id": initiator,
            "target_id": target,
            "type": 1,
            "state": ENDED[n % len(ENDED)],
            "created_at": at(begun),
            "updated_at": at(begun + rng.random() * 300),
        }

    def table(row: type[SQLModel]) -> Table:
        found = row.__table__  # type: ignore[attr-defined]
        assert isinstance(found, Table)
        return found

    _insert(
        connection,
        table(AgentRow),
        range(AGENTS),
        lambda i: {
            "agent_id": agents[i],
            "specialization": 1 + i % SPECIALIZATIONS,
            "capabilities": "",
            "version": "bench",
            "online": False,
            "last_seen_at": at(0),
            "created_at": at(0),
        },
    )
    _insert(
        connection,
        table(ArtifactRow),
        range(1, artifacts + 1),
        lambda n: {
            "artifact_id": f"art_{n}",
            "seq": n,
            "kind": 1 + n % 3,
            "contributor_id": rng.choice(agents),
            "specialization": 1 + n % SPECIALIZATIONS,
            "name": "x",
            "created_at": at(rng.random() * SPAN_SECONDS),
            "body": b"",
        },
    )
    _insert(connection, table(CollaborationRow), range(collaborations), collaboration)
    _insert(
        connection,
        table(FeatureRequestRow),
        range(artifacts + 1, artifacts + requests + 1),
        lambda n: {
            "request_id": f"feat_{n}",
            "seq": n,
            "requester_id": rng.choice(agents),
            "feature": "memory_allocator",
            "delivery_count": 1,
            "created_at": at(rng.random() * SPAN_SECONDS),
            "body": b"",
        },
    )
    _insert(
        connection,
        table(FeatureDeliveryRow),
        range(requests),
        lambda n: {
            "artifact_id": f"delivery_{n}",
            "request_id": f"feat_{artifacts + 1 + rng.randrange(max(1, requests))}",
            "deliverer_id": rng.choice(agents),
            "created_at": at(SPAN_SECONDS + rng.random() * 60),
        },
    )


def _baseline(path: Path) -> float:
    """One plain scan of what the shares figure reads, with sqlite3 alone."""
    started = time.perf_counter()
    with sqlite3.connect(path) as db:
        for _ in db.execute("SELECT specialization, created_at FROM artifact"):
            pass
    return time.perf_counter() - started


def measure(path: Path, rows: int) -> Measured:
    url = f"sqlite:///{path}"
    started = time.perf_counter()
    asyncio.run(read(url, Window()))
    seconds = time.perf_counter() - started
    # Memory in a second pass: tracing slows Python down, so it is not timed.
    tracemalloc.start()
    try:
        asyncio.run(read(url, Window()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Measured(rows, seconds, peak, _baseline(path))


def report_scale(rows: int, workdir: Path) -> tuple[Measured, Measured]:
    """The small database (rows / 10) and the large one, measured the same way."""
    results = []
    for size in (max(1, rows // 10), rows):
        path = workdir / f"report-{size}.db"
        synthesize(f"sqlite:///{path}", size)
        results.append(measure(path, size))
    return results[0], results[1]


def summary(small: Measured, large: Measured) -> list[str]:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    return [
        f"rows               {small.rows:>12,} {large.rows:>12,}   ratio",
        f"report read        {small.seconds:>11.2f}s {large.seconds:>11.2f}s   "
        f"{large.seconds / small.seconds:.1f}x",
        f"baseline scan      {small.baseline_seconds:>11.2f}s {large.baseline_seconds:>11.2f}s   "
        f"{large.baseline_seconds / small.baseline_seconds:.1f}x",
        f"read / baseline    {small.seconds / small.baseline_seconds:>11.1f}x "
        f"{large.seconds / large.baseline_seconds:>11.1f}x",
        f"peak Python memory {mib(small.peak_bytes):>12} {mib(large.peak_bytes):>12}   "
        f"{large.peak_bytes / small.peak_bytes:.2f}x",
    ]

"""`kernelhub-bench join`: how long a fresh agent takes to go live on a hub whose event log
holds a million events, when it starts from now, against the same join on an empty hub.

The log is filled fast, straight into the SQLite file (executemany, as the baselines do):
broadcast shares, and every tenth event a collaboration update to two agents (with its
recipient rows). The hubs are real `kernelhub-hub serve` processes; the measured joins are
real `HubClient`s: from `start()` to the hub's `replay_complete` (`client.replayed`), the
moment the agent is live. A warm-up join on each hub first is not counted. Beside them, for
scale, one join that resumes 1,000 events back on the full log, timed until the 900
broadcasts among them have reached the application.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import schema
from hub_service.sql_write import make_engine
from hub_service.subscriptions import tags_of
from hub_service.testing import TestHub
from trainer_service import HubClient

from .common import median, pattern

CHUNK = 50_000  # rows per executemany
RESUME_BACK = 1_000
SPARSE_SHARER = 7  # the sharer whose events a sparse replay asks for
BUSY_REPLAYS = 4  # the hub's reader threads (`SqlStore`)
BUSY_LEAD = 0.1  # seconds those replays run before the resume beside them begins
NETWORKING = pb.SPECIALIZATION_NETWORKING


def _rows(events: int) -> Iterator[tuple[tuple[Any, ...], list[tuple[int, str]]]]:
    """Each event's row, tagged as the hub tags it (so subscriptions and replays see what
    they would see of a real log), and its recipient rows, seq 1..events."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")  # SQLAlchemy's SQLite format
    artifact = pb.Artifact(
        artifact_id="art_bench", kind=pb.ARTIFACT_KIND_PATTERN, pattern=pattern("bench")
    )
    for seq in range(1, events + 1):
        sender = _sharer(seq % 50)
        if seq % 10:
            event = pb.HubEvent(seq=seq, sender_id=sender, artifact_shared=artifact)
            yield _row(event, True, now), []
        else:
            update = pb.CollaborationUpdated(
                collaboration=pb.Collaboration(
                    session_id=f"col_{seq}",
                    initiator_id=sender,
                    target_id="bench_partner",
                    state=pb.COLLABORATION_STATE_ACTIVE,
                    progress=0.5,
                )
            )
            event = pb.HubEvent(seq=seq, sender_id=sender, collaboration_updated=update)
            recipients = [(seq, sender), (seq, "bench_partner")]
            yield _row(event, False, now), recipients


def _sharer(n: int) -> str:
    return f"bench_sharer_{n}"


def _row(event: pb.HubEvent, broadcast: bool, created_at: str) -> tuple[Any, ...]:
    tags = tags_of(event, NETWORKING)  # every sharer is a networking trainer
    return (
        event.seq,
        event.sender_id,
        broadcast,
        tags.kind,
        tags.artifact_kind,
        tags.spec_mask,
        created_at,
        event.SerializeToString(),
    )


def fill(db: Path, events: int) -> float:
    """A database at this hub's schema whose log holds `events` events; seconds taken."""
    started = time.perf_counter()
    engine = make_engine(f"sqlite:///{db}")
    try:
        schema.ensure(engine, True)
    finally:
        engine.dispose()
    connection = sqlite3.connect(db)
    try:
        rows = _rows(events)
        while chunk := [next(rows, None) for _ in range(CHUNK)]:
            taken = [row for row in chunk if row is not None]
            if not taken:
                break
            connection.executemany(
                "INSERT INTO event (seq, sender_id, broadcast, kind, artifact_kind, "
                "spec_mask, created_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [event for event, _ in taken],
            )
            connection.executemany(
                "INSERT INTO event_recipient (seq, agent_id) VALUES (?, ?)",
                [r for _, recipients in taken for r in recipients],
            )
            connection.commit()
    finally:
        connection.close()
    return time.perf_counter() - started


async def _join(
    hub: TestHub,
    agent_id: str,
    token: str,
    resume_after_seq: int = 0,
    owed: int = 0,
    subscription: pb.Subscription | None = None,
) -> float:
    """Seconds from a fresh HubClient's start to live (its replay complete) with the `owed`
    events its replay must bring handed to the application. A `subscription` replays from
    the log's beginning."""
    started = time.perf_counter()
    client = HubClient(
        hub.target,
        agent_id,
        token,
        specialization=NETWORKING,
        resume_after_seq=resume_after_seq,
        skip_history=False if subscription is not None else None,
        subscription=subscription,
    )
    try:
        await client.start()
        await asyncio.wait_for(_receive(client, owed, resume_after_seq, subscription), 120)
        await asyncio.wait_for(client.replayed.wait(), 120)
        return time.perf_counter() - started
    finally:
        await client.close()


async def _receive(
    client: HubClient, events: int, after: int, subscription: pb.Subscription | None
) -> None:
    """Until `events` events have come, each a share after `after`, in seq order, by a
    contributor the subscription names (if it names any): the figure is of a replay that
    delivered what it owed, not merely of one that ended."""
    if events == 0:
        return  # (the loop below would wait for an event that never comes)
    last = after
    contributors = set(subscription.contributors) if subscription is not None else set()
    async for item in client.events():
        if not isinstance(item, pb.HubEvent):
            continue
        if (
            item.seq <= last
            or not item.HasField("artifact_shared")
            or (contributors and item.sender_id not in contributors)
        ):
            raise RuntimeError(f"{client.agent_id}: event {item.seq} is not one it was owed")
        last = item.seq
        events -= 1
        if events == 0:
            return


def _sparse_replays(head: int) -> dict[str, tuple[pb.Subscription, int]]:
    """Replays from the beginning whose filter lets little or nothing through, and how many
    events each is owed: the log is read in seq order, so their cost is the log's span."""
    return {
        "one_sharer_of_50": (
            pb.Subscription(contributors=[_sharer(SPARSE_SHARER)]),
            (head - SPARSE_SHARER) // 50 + 1,  # never a tenth event: 7 is odd
        ),
        "nothing_matches": (pb.Subscription(contributors=["bench_nobody"]), 0),
    }


def _broadcasts_after(seq: int, head: int) -> int:
    """How many of the filled log's events after `seq` are broadcasts (`_rows`: all but
    every tenth), which any agent but their sender is owed."""
    return (head - seq) - (head // 10 - seq // 10)


async def _joins(db: Path, joins: int, resume: bool) -> dict[str, Any]:
    sparse = ["bench_sparse_one", "bench_sparse_none"]
    busy = [f"bench_sparse_busy_{i}" for i in range(BUSY_REPLAYS)]
    agents = [f"bench_joiner_{i}" for i in range(joins + 3)] + sparse + busy
    hub = TestHub.subprocess(db, env={"KERNELHUB_TRAINING_SYNC_INTERVAL": "0"})
    tokens = await hub.issue_tokens(*agents)
    started = time.perf_counter()
    async with hub:
        start_seconds = time.perf_counter() - started
        await _join(hub, agents[0], tokens[agents[0]])  # warm-up: not counted
        times = [await _join(hub, a, tokens[a]) for a in agents[1 : joins + 1]]
        result: dict[str, Any] = {"hub_start_seconds": start_seconds, "join_seconds": times}
        if resume:
            head = (
                await hub.stub().GetHubStats(
                    pb.GetHubStatsRequest(),
                    metadata=(("authorization", f"Bearer {tokens[agents[0]]}"),),
                )
            ).head_seq
            after = max(0, head - RESUME_BACK)
            result["resume_events"] = resume_owed = _broadcasts_after(after, head)
            resumer = agents[joins + 1]
            result["resume_seconds"] = await _join(
                hub, resumer, tokens[resumer], after, resume_owed
            )
            replays = _sparse_replays(head)
            result["sparse_replays"] = {}
            for agent, (name, (subscription, owed)) in zip(sparse, replays.items(), strict=True):
                seconds = await _join(hub, agent, tokens[agent], 0, owed, subscription)
                result["sparse_replays"][name] = {"events": owed, "seconds": seconds}
            # The same resume, arriving while that last replay runs once per reader thread
            # (begun BUSY_LEAD seconds before: the scenario's shape, not a wait for a state).
            nothing, _ = replays["nothing_matches"]
            beside = [
                asyncio.create_task(_join(hub, agent, tokens[agent], 0, 0, nothing))
                for agent in busy
            ]
            await asyncio.sleep(BUSY_LEAD)
            resumer = agents[joins + 2]
            result["resume_beside_sparse_seconds"] = await _join(
                hub, resumer, tokens[resumer], after, resume_owed
            )
            await asyncio.gather(*beside)
    return result


async def measure(events: int, joins: int) -> dict[str, Any]:
    """Both hubs, one after the other, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="kernelhub-join-") as tmp:
        empty_db, full_db = Path(tmp) / "empty.db", Path(tmp) / "full.db"
        fill(empty_db, 0)
        fill_seconds = fill(full_db, events)
        empty = await _joins(empty_db, joins, resume=False)
        full = await _joins(full_db, joins, resume=True)
    full_join, empty_join = median(full["join_seconds"]), median(empty["join_seconds"])
    return {
        "events": events,
        "joins": joins,
        "fill_seconds": fill_seconds,
        "empty": empty,
        "full": full,
        "join_from_now_seconds": full_join,
        "baseline_empty_hub_seconds": empty_join,
        "ratio": full_join / empty_join,
    }


def report(result: dict[str, Any]) -> str:
    events = result["events"]
    full, empty = result["full"], result["empty"]
    lines = [
        f"log of {events:,} events filled in {result['fill_seconds']:.1f} s; "
        f"hub start {full['hub_start_seconds']:.2f} s (empty: {empty['hub_start_seconds']:.2f} s)",
        f"fresh agent live, starting from now, {events:,}-event log: "
        f"{result['join_from_now_seconds'] * 1000:.1f} ms (median of {result['joins']})",
        f"baseline, the same join on an empty hub: "
        f"{result['baseline_empty_hub_seconds'] * 1000:.1f} ms",
        f"ratio: {result['ratio']:.2f}x  (target: live in under 1 s)",
        f"for scale: a resume {RESUME_BACK:,} events back on the full log "
        f"({full['resume_events']:,} of them owed): {full['resume_seconds'] * 1000:.1f} ms",
    ]
    for name, replay in full["sparse_replays"].items():
        lines.append(
            f"a filtered replay from the beginning, {name.replace('_', ' ')} "
            f"({replay['events']:,} events owed): {replay['seconds'] * 1000:.1f} ms"
        )
    lines.append(
        f"the resume {RESUME_BACK:,} back again, {BUSY_LEAD * 1000:.0f} ms into {BUSY_REPLAYS} "
        f"of the replays that match nothing: {full['resume_beside_sparse_seconds'] * 1000:.1f} ms"
    )
    return "\n".join(lines)


def run(events: int, joins: int, out: Path | None) -> int:
    result = asyncio.run(measure(events, joins))
    print(report(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0

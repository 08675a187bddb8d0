"""Several hub replicas (processes) on one PostgreSQL database: one log in one order, every
replica delivers every event, one live stream per agent hub-wide, revocation and idempotency
wherever the agent is. Each test has a fresh database of its own (LISTEN/NOTIFY channels are
per database, so a schema would not keep tests apart)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
import sqlalchemy
from sqlalchemy import make_url

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.collaboration import Policy
from hub_service.sql_write import LOCK_STATEMENT, SharedLog, SqlWriter, make_engine
from hub_service.testing import TestHub, die_with_parent

from .conftest import (
    POSTGRES_URL,
    WAIT,
    RawTrainer,
    async_stub,
    auth,
    hello,
    make_config,
    pattern,
)
from .test_collaboration import collaborative_component

pytestmark = pytest.mark.timeout(120)

REPLICA_ARGS = (
    "--replica",
    "true",
    "--replica-catch-up-interval",
    "0.2",
    "--training-sync-interval",
    "0",
    "--token-recheck-interval",
    "0.3",
)


def _admin_conninfo() -> str:
    return (
        make_url(POSTGRES_URL)
        .set(drivername="postgresql", database="postgres")
        .render_as_string(hide_password=False)
    )


@pytest.fixture
def replica_url() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    name = f"kh_replicas_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Replicas:
    hubs: list[TestHub]
    tokens: dict[str, str]  # agent id -> its bearer token


@contextlib.asynccontextmanager
async def replicas(
    url: str,
    count: int,
    *extra: str,
    agents: Sequence[str] = (),
    metrics_ports: Sequence[int] = (),
) -> AsyncIterator[Replicas]:
    """`count` replica processes on `url`, and tokens for `agents` (issued on the database
    while they start); replica i serves /metrics on `metrics_ports[i]`, if given."""
    hubs = [
        TestHub.subprocess(
            url,
            args=[
                *REPLICA_ARGS,
                *extra,
                *(("--metrics-port", str(metrics_ports[i])) if metrics_ports else ()),
            ],
            env={"KERNELHUB_LOG_LEVEL": "WARNING"},
            name=f"replica{i}",
            preexec_fn=die_with_parent,  # a killed test run leaves no replica serving
        )
        for i in range(count)
    ]
    try:
        issuing = [asyncio.ensure_future(hubs[0].issue_tokens(*agents))] if agents else []
        await asyncio.gather(*issuing, *(h.start() for h in hubs))
        yield Replicas(hubs, issuing[0].result() if issuing else {})
    finally:
        for h in hubs:
            await h.close()


async def connect(
    hub: TestHub, agent_id: str, token: str, resume_after: int = 0, **kw: Any
) -> RawTrainer:
    call = async_stub(hub.channel()).Connect(metadata=auth(token))
    await call.write(
        pb.ConnectRequest(
            message_id="hello", hello=hello(agent_id, resume_after_seq=resume_after, **kw)
        )
    )
    return await RawTrainer.welcomed(agent_id, call)


async def ended_with(trainer: RawTrainer) -> grpc.StatusCode:
    """Reads the stream to its end; its status."""
    with contextlib.suppress(EOFError, grpc.aio.AioRpcError):
        while True:
            await trainer._read_one()
    code: grpc.StatusCode = await asyncio.wait_for(trainer.call.code(), WAIT)
    return code


def artifact_seqs(trainer: RawTrainer) -> list[int]:
    return [e.seq for e in trainer.events if e.HasField("artifact_shared")]


@dataclass
class LogWatcher:
    """Polls the event log as fast as it can, as a resuming trainer would read it: the seqs
    after the last one it has are read, and each read must continue it with no hole. A hole
    seen is a seq committed above one not (yet) visible: a trainer resuming after the
    higher one would never get the lower."""

    conninfo: str
    last: int = 0
    polls: int = 0
    holes: list[tuple[int, int]] = field(default_factory=list)  # (missing, seen above it)

    async def run(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as db:
            while True:
                stopping = stop.is_set()  # one last read after the writers are done
                await self.poll(db)
                if stopping:
                    return

    async def poll(self, db: psycopg.AsyncConnection[tuple[int]]) -> None:
        rows = await (
            await db.execute("SELECT seq FROM event WHERE seq > %s ORDER BY seq", (self.last,))
        ).fetchall()
        self.polls += 1
        for (seq,) in rows:
            if seq != self.last + 1:
                self.holes.append((self.last + 1, seq))
            self.last = max(self.last, seq)


async def log_seqs(conninfo: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(conninfo) as db:
        return [
            s for (s,) in await (await db.execute("SELECT seq FROM event ORDER BY seq")).fetchall()
        ]


async def share_all(trainer: RawTrainer, count: int) -> list[pb.Receipt]:
    ids = [
        await trainer.send(
            share_pattern=pb.SharePattern(pattern=pattern(f"{trainer.agent_id}-{i}"))
        )
        for i in range(count)
    ]
    return [await trainer.receipt(message_id) for message_id in ids]


async def share_one_by_one(trainer: RawTrainer, count: int) -> list[pb.Receipt]:
    return [
        await trainer.receipt(
            await trainer.send(
                share_pattern=pb.SharePattern(pattern=pattern(f"{trainer.agent_id}-{i}"))
            )
        )
        for i in range(count)
    ]


async def wait_for(trainer: RawTrainer, seqs: set[int]) -> None:
    """Reads until every seq in `seqs` has arrived (each read has its deadline)."""
    while not seqs <= {e.seq for e in trainer.events}:
        await trainer._read_one()


# --- one log, one order; every replica delivers everything -------------------------------


async def test_three_replicas_one_log_every_trainer_gets_exactly_its_events(
    replica_url: str,
) -> None:
    agents = [f"AI_Node_{i}" for i in range(9)]
    shares = 25
    async with replicas(replica_url, 3, agents=[*agents, "AI_Node_late"]) as running:
        hubs, issued = running.hubs, running.tokens
        trainers = [
            await connect(hubs[i % 3], agent, issued[agent]) for i, agent in enumerate(agents)
        ]
        watcher = LogWatcher(_conninfo(replica_url))
        stop = asyncio.Event()
        watching = asyncio.create_task(watcher.run(stop))
        # Each trainer waits for each receipt before its next share: nine committers that
        # keep all three replicas' writers contending for the log the whole time.
        receipts = await asyncio.gather(*(share_one_by_one(t, shares) for t in trainers))
        stop.set()
        await watching
        by_sender = {
            t.agent_id: {r.seq for r in rs} for t, rs in zip(trainers, receipts, strict=True)
        }
        every = set().union(*by_sender.values())
        assert len(every) == len(agents) * shares  # one seq per share, none shared
        # The replicas' commits interleaved in the log: they did contend for it.
        replica_of = {seq: i % 3 for i, t in enumerate(trainers) for seq in by_sender[t.agent_id]}
        in_order = [replica_of[seq] for seq in sorted(every)]
        switches = sum(1 for x, y in itertools.pairwise(in_order) if x != y)
        assert switches > 3, f"the replicas committed one after the other: {switches} switches"
        for trainer in trainers:
            entitled = every - by_sender[trainer.agent_id]
            await wait_for(trainer, entitled)
            seqs = [e.seq for e in trainer.events]
            assert seqs == sorted(set(seqs)), f"{trainer.agent_id}: not once each in seq order"
            assert set(artifact_seqs(trainer)) == entitled
        # A trainer connecting afterwards (replay, from any replica) gets the same log.
        late = await connect(hubs[1], "AI_Node_late", issued["AI_Node_late"])
        await wait_for(late, every)
        assert set(artifact_seqs(late)) == every
        assert len(artifact_seqs(late)) == len(every)
        for trainer in [*trainers, late]:
            await trainer.close()
    assert watcher.holes == [], f"a reader saw seqs above uncommitted ones: {watcher.holes[:5]}"
    assert watcher.polls > 1
    logged = await log_seqs(_conninfo(replica_url))
    assert logged == list(range(1, len(logged) + 1))  # no gap, no duplicate


async def test_directed_events_reach_only_their_recipients_across_replicas(
    replica_url: str,
) -> None:
    """A collaboration between trainers on two replicas: each partner gets its updates from
    the other's replica, and completing it from both at once completes it once; a trainer on a
    third replica, entitled to none of the updates, gets none."""
    names = ["AI_Node_x", "AI_Node_y", "AI_Node_z"]
    async with replicas(replica_url, 3, agents=names) as running:
        hubs, issued = running.hubs, running.tokens
        x = await connect(hubs[0], "AI_Node_x", issued["AI_Node_x"])
        y = await connect(
            hubs[1],
            "AI_Node_y",
            issued["AI_Node_y"],
            specialization=pb.SPECIALIZATION_SECURITY,
            capabilities=["security_analysis"],
        )
        z = await connect(hubs[2], "AI_Node_z", issued["AI_Node_z"])
        proposal = await x.receipt(
            await x.send(
                propose_collaboration=pb.ProposeCollaboration(
                    target_agent_id="AI_Node_y",
                    type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
                    description="secure transport",
                )
            )
        )
        await y.event("collaboration_updated", collaboration__state=pb.COLLABORATION_STATE_PROPOSED)
        accepted = await y.receipt(
            await y.send(
                accept_collaboration=pb.AcceptCollaboration(session_id=proposal.resource_id)
            )
        )
        await x.event("collaboration_updated", collaboration__state=pb.COLLABORATION_STATE_ACTIVE)
        # Both partners complete it at once, each on its replica: the database serializes the
        # two steps (the log's lock), so one completes it and the other is refused.
        complete = pb.CompleteCollaboration(
            session_id=proposal.resource_id, component=collaborative_component()
        )
        sent = [await p.send(complete_collaboration=complete) for p in (x, y)]
        answers = [await p.answer(m) for p, m in zip((x, y), sent, strict=True)]
        done = [a for a in answers if isinstance(a, pb.Receipt)]
        refused = [a for a in answers if isinstance(a, pb.RequestError)]
        assert len(done) == 1 and len(refused) == 1, answers
        assert refused[0].code_name == "FAILED_PRECONDITION"
        (later,) = await share_all(x, 1)
        await wait_for(z, {later.seq})  # in seq order: anything routed to z before it came
        assert not [e for e in z.events if e.HasField("collaboration_updated")]
        for partner in (x, y):
            await wait_for(partner, {proposal.seq, accepted.seq, done[0].seq})
            updates = [e.seq for e in partner.events if e.HasField("collaboration_updated")]
            assert updates == [proposal.seq, accepted.seq, done[0].seq], partner.agent_id
        for trainer in (x, y, z):
            await trainer.close()


async def test_the_watcher_catches_a_seq_committed_above_an_uncommitted_one(
    replica_url: str,
) -> None:
    """The check above can fail: two transactions committing seqs out of order (what the
    advisory lock prevents) are caught by the same reader."""
    async with replicas(replica_url, 1):
        pass  # the schema
    conninfo = _conninfo(replica_url)
    watcher = LogWatcher(conninfo)
    insert = (
        "INSERT INTO event (seq, sender_id, broadcast, created_at, body) "
        "VALUES (%s, 'x', true, now(), '')"
    )
    async with (
        await psycopg.AsyncConnection.connect(conninfo) as low,
        await psycopg.AsyncConnection.connect(conninfo) as high,
        await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as reader,
    ):
        await low.execute(insert, (1,))  # seq 1 taken, not committed
        await high.execute(insert, (2,))
        await high.commit()
        await watcher.poll(reader)
        await low.commit()
        await watcher.poll(reader)
    assert watcher.holes == [(1, 2)]
    assert watcher.last == 2


async def test_lost_database_connections_lose_no_event(replica_url: str) -> None:
    """Notifications carry events across at once (the catch-up read is a minute away here);
    then every connection to the database is cut, LISTEN's and the pools' alike, as a database
    restart would: what commits next still reaches the trainers on the other replica."""
    async with replicas(
        replica_url, 2, "--replica-catch-up-interval", "60", agents=["AI_Node_a", "AI_Node_b"]
    ) as running:
        hubs, issued = running.hubs, running.tokens
        a = await connect(hubs[0], "AI_Node_a", issued["AI_Node_a"])
        b = await connect(hubs[1], "AI_Node_b", issued["AI_Node_b"])
        before = await share_all(b, 3)
        await wait_for(a, {r.seq for r in before})
        async with await psycopg.AsyncConnection.connect(
            _conninfo(replica_url), autocommit=True
        ) as db:
            cut = await (
                await db.execute(
                    "SELECT query LIKE 'LISTEN%%', pg_terminate_backend(pid) "
                    "FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).fetchall()
        assert [listening for listening, _ in cut].count(True) == 2
        after = await share_all(b, 3)
        await wait_for(a, {r.seq for r in after})
        assert artifact_seqs(a) == [r.seq for r in before + after]
        await a.close()
        await b.close()


async def test_without_notifications_the_catch_up_read_delivers(replica_url: str) -> None:
    """A replica that hears no notification at all (its LISTEN ended) still delivers every
    event, by the periodic read alone."""
    configs = [
        make_config(replica_url, replica=True, replica_catch_up_interval=0.2) for _ in range(2)
    ]
    async with TestHub.in_process(configs[0]) as deaf, TestHub.in_process(configs[1]) as other:
        follower = deaf.server.follower
        assert follower is not None and follower.listener is not None
        follower.listener.cancel()
        a = await connect(deaf, "AI_Node_a", await deaf.issue_token("AI_Node_a"))
        b = await connect(other, "AI_Node_b", await other.issue_token("AI_Node_b"))
        receipts = await share_all(b, 3)
        await wait_for(a, {r.seq for r in receipts})
        assert artifact_seqs(a) == [r.seq for r in receipts]
        assert follower.notifications == 0
        await a.close()
        await b.close()


async def test_a_replica_frozen_holding_the_log_lock_stalls_nobody_for_long(
    replica_url: str,
) -> None:
    """A batch that took the log's lock and then went silent (its replica's host vanished
    mid-commit) is ended by PostgreSQL after the replica's `replica_lock_idle_timeout`; the
    other replicas' commits then go on."""
    async with replicas(replica_url, 1, agents=["AI_Node_f"]) as running:
        (hub,), issued = running.hubs, running.tokens
        frozen = SqlWriter(
            make_engine(replica_url), Policy(), SharedLog("frozen", lock_idle_timeout=1.0)
        )
        with frozen.engine.connect() as holder:
            holder.execute(LOCK_STATEMENT, frozen.lock_params)  # and then nothing
            trainer = await connect(hub, "AI_Node_f", issued["AI_Node_f"])
            (receipt,) = await share_all(trainer, 1)
            assert receipt.seq > 0
            with pytest.raises(sqlalchemy.exc.DBAPIError, match="idle-in-transaction"):
                holder.execute(sqlalchemy.text("SELECT 1"))  # PostgreSQL ended it
        frozen.dispose()
        await trainer.close()


# --- one live stream per agent, revocation, idempotency across replicas -----------------


async def test_reconnecting_to_another_replica_supersedes_the_old_stream(
    replica_url: str,
) -> None:
    async with replicas(replica_url, 2, agents=["AI_Node_x", "AI_Node_y"]) as running:
        hubs, issued = running.hubs, running.tokens
        old = await connect(hubs[0], "AI_Node_x", issued["AI_Node_x"])
        new = await connect(hubs[1], "AI_Node_x", issued["AI_Node_x"])
        assert await ended_with(old) == grpc.StatusCode.ABORTED
        assert "another replica" in (await old.call.details() or "")
        # The new stream lives on, and its agent is still online for everyone.
        y = await connect(hubs[0], "AI_Node_y", issued["AI_Node_y"])
        (receipt,) = await share_all(new, 1)
        await wait_for(y, {receipt.seq})
        agents = await async_stub(hubs[0].channel()).ListAgents(
            pb.ListAgentsRequest(online_only=True), metadata=auth(issued["AI_Node_y"]), timeout=WAIT
        )
        assert {a.agent_id for a in agents.agents} == {"AI_Node_x", "AI_Node_y"}
        await new.close()
        await y.close()


async def test_revoking_a_token_ends_its_stream_on_every_replica(replica_url: str) -> None:
    async with replicas(replica_url, 2, agents=["AI_Node_r"]) as running:
        hubs, issued = running.hubs, running.tokens
        stream = await connect(hubs[1], "AI_Node_r", issued["AI_Node_r"])
        await _cli("token", "revoke", "AI_Node_r", "--database-url", replica_url)
        assert await ended_with(stream) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_message_resent_to_another_replica_is_recognised(replica_url: str) -> None:
    async with replicas(replica_url, 2, agents=["AI_Node_m"]) as running:
        hubs, issued = running.hubs, running.tokens
        first = await connect(hubs[0], "AI_Node_m", issued["AI_Node_m"])
        body = pb.SharePattern(pattern=pattern("resent"))
        receipt = await first.receipt(await first.send("m-1", share_pattern=body))
        await hubs[0].kill()  # no goodbye: the trainer does not know its receipt was stored
        again = await connect(hubs[1], "AI_Node_m", issued["AI_Node_m"])
        duplicate = await again.receipt(await again.send("m-1", share_pattern=body))
        assert duplicate.duplicate and duplicate.seq == receipt.seq
        assert duplicate.resource_id == receipt.resource_id
        await again.close()
    async with await psycopg.AsyncConnection.connect(_conninfo(replica_url)) as db:
        (count,) = await (await db.execute("SELECT count(*) FROM artifact")).fetchone() or (0,)
    assert count == 1


async def test_replica_mode_is_refused_without_postgresql(tmp_path: os.PathLike[str]) -> None:
    hub = TestHub.subprocess(
        f"sqlite:///{tmp_path}/hub.db", args=["--replica", "true"], start_timeout=30
    )
    with pytest.raises(Exception, match="replica mode needs PostgreSQL"):
        await hub.start()
    await hub.close()


async def _cli(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()

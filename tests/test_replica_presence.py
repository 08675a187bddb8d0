"""Replicas share presence and hold leases: rosters and joins/leaves are hub-wide, a killed
or paused replica's agents go offline (and their sessions follow the offline policy), the
hub-wide jobs run on the leader only, retention prunes across replicas without losing what
a reader is owed, and a component shared on one replica wakes a validator waiting on another.
Each test has a fresh database and real replica processes (tests/test_replicas.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request

import grpc
import psycopg
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role
from hub_service.testing import TestHub

from .conftest import WAIT, RawTrainer, async_stub, auth, code_component, free_ports
from .test_replicas import (
    _conninfo,
    connect,
    ended_with,
    replica_url,
    replicas,
    share_all,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)
__all__ = ["replica_url"]  # the fixture, imported for these tests

# Seconds: --replica-lease for these tests. Short, for the tests that wait one out; long
# enough that a stall of a second or two on a loaded machine loses no replica its lease.
LEASE = "3"
FAST = ("--replica-lease", LEASE, "--reaper-interval", "0.1", "--presence-linger", "0.05")


async def changes_about(trainer: RawTrainer, agent_id: str) -> list[bool]:
    """Each presence change `trainer` was told about `agent_id`: True online, False offline
    (roster pages not counted)."""
    told = []
    for update in trainer.presence:
        if update.roster:
            continue
        told += [True for a in update.online if a.agent_id == agent_id]
        told += [False for a in update.offline if a == agent_id]
    return told


async def db_online(url: str, agent_id: str) -> bool | None:
    async with await psycopg.AsyncConnection.connect(_conninfo(url)) as db:
        row = await (
            await db.execute("SELECT online FROM agent WHERE agent_id = %s", (agent_id,))
        ).fetchone()
    return None if row is None else bool(row[0])


async def test_rosters_and_presence_changes_are_hub_wide(replica_url: str) -> None:
    names = ["AI_Node_a", "AI_Node_b", "AI_Node_c", "AI_Node_m"]
    async with replicas(replica_url, 2, *FAST, agents=names) as running:
        (a_hub, b_hub), issued = running.hubs, running.tokens
        a = await connect(a_hub, "AI_Node_a", issued["AI_Node_a"])
        # A newcomer on B gets A's agent in its roster (its Welcome counts it).
        b = await connect(b_hub, "AI_Node_b", issued["AI_Node_b"])
        await b.until_roster()
        assert b.welcome.roster_size == 1 and list(b.online) == ["AI_Node_a"]
        await a.joined("AI_Node_b")  # and A hears B's join
        # A join on A reaches B exactly once; its leave too.
        c = await connect(a_hub, "AI_Node_c", issued["AI_Node_c"])
        await b.joined("AI_Node_c")
        await a.joined("AI_Node_c")
        # Reconnecting to the other replica with the same details (superseding the stream
        # on A) changes nothing for anyone.
        again = await connect(b_hub, "AI_Node_c", issued["AI_Node_c"])
        assert await ended_with(c) == grpc.StatusCode.ABORTED
        marker = await connect(a_hub, "AI_Node_m", issued["AI_Node_m"])
        await b.joined("AI_Node_m")
        await a.joined("AI_Node_m")
        assert await changes_about(b, "AI_Node_c") == [True]
        assert await changes_about(a, "AI_Node_c") == [True]
        await again.close()
        await b.left("AI_Node_c")
        await a.left("AI_Node_c")
        assert (await changes_about(b, "AI_Node_c"))[-1] is False
        # A Watch on B sees A's agents in its roster.
        observer = await b_hub.issue_token("observer", role=Role.OBSERVER)
        watch = async_stub(b_hub.channel()).Watch(
            pb.WatchRequest(skip_history=True), metadata=auth(observer)
        )
        seen: set[str] = set()
        while True:
            response = await asyncio.wait_for(watch.read(), WAIT)
            seen |= {agent.agent_id for agent in response.presence.online}
            if response.presence.roster_complete:
                break
        assert seen == {"AI_Node_a", "AI_Node_b", "AI_Node_m"}
        watch.cancel()
        for trainer in (a, b, marker):
            await trainer.close()


async def test_a_killed_replica_s_agents_go_offline_and_their_sessions_follow_policy(
    replica_url: str,
) -> None:
    names = ["AI_Node_x", "AI_Node_y"]
    async with replicas(
        replica_url, 2, *FAST, "--partner-offline-grace", "0.5", agents=names
    ) as running:
        (survivor, doomed), issued = running.hubs, running.tokens
        x = await connect(survivor, "AI_Node_x", issued["AI_Node_x"])
        y = await connect(doomed, "AI_Node_y", issued["AI_Node_y"])
        await x.joined("AI_Node_y")
        proposal = await x.receipt(
            await x.send(
                propose_collaboration=pb.ProposeCollaboration(
                    target_agent_id="AI_Node_y",
                    type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
                    description="across replicas",
                )
            )
        )
        await y.event("collaboration_updated", collaboration__state=pb.COLLABORATION_STATE_PROPOSED)
        await y.receipt(
            await y.send(
                accept_collaboration=pb.AcceptCollaboration(session_id=proposal.resource_id)
            )
        )
        await x.event("collaboration_updated", collaboration__state=pb.COLLABORATION_STATE_ACTIVE)
        assert await db_online(replica_url, "AI_Node_y") is True
        clock = asyncio.get_running_loop()
        killed = clock.time()
        await doomed.kill()  # SIGKILL: no AgentOffline, no lease released
        await asyncio.wait_for(x.left("AI_Node_y"), float(LEASE) * 4 + WAIT)
        left_after = clock.time() - killed
        assert await db_online(replica_url, "AI_Node_y") is False
        expired = await asyncio.wait_for(
            x.event("collaboration_updated", collaboration__state=pb.COLLABORATION_STATE_EXPIRED),
            WAIT,
        )
        assert expired.collaboration_updated.collaboration.session_id == proposal.resource_id
        assert "AI_Node_y went offline" in expired.collaboration_updated.collaboration.end_reason
        # Not before its lease could expire: the lease, not the stream's end, said so.
        assert left_after > float(LEASE) / 3
        await x.close()


async def oldest_seq(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(_conninfo(url)) as db:
        row = await (await db.execute("SELECT min(seq) FROM event")).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def test_a_paused_replica_that_lost_its_lease_ends_its_streams(replica_url: str) -> None:
    """While it is paused the survivor's sharer has the leader prune past what its trainer
    had received; back, it ends that stream before handing it anything after the hole."""
    names = ["AI_Node_x", "AI_Node_y"]
    keep_few = ("--event-retention", "0", "--event-retention-max-events", "4")
    async with replicas(
        replica_url, 2, *FAST, *keep_few, "--retention-interval", "0.1", agents=names
    ) as running:
        (survivor, paused), issued = running.hubs, running.tokens
        x = await connect(survivor, "AI_Node_x", issued["AI_Node_x"])
        y = await connect(paused, "AI_Node_y", issued["AI_Node_y"])
        await x.joined("AI_Node_y")
        (first,) = [r.seq for r in await share_all(x, 1)]
        await asyncio.wait_for(wait_for(y, {first}), WAIT)
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            await asyncio.wait_for(x.left("AI_Node_y"), float(LEASE) * 4 + WAIT)
            later = [r.seq for r in await share_all(x, 12)]

            async def pruned_past_first() -> None:
                while await oldest_seq(replica_url) <= first + 1:  # noqa: ASYNC110 (the database)
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(pruned_past_first(), WAIT)
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # Back, it finds its lease gone: y's stream ends (not served as if nothing happened),
        # and nothing after the hole reached it first.
        assert await ended_with(y) == grpc.StatusCode.UNAVAILABLE
        assert "lost its lease" in (await y.call.details() or "")
        after_hole = [e.seq for e in y.events if e.seq > first]
        assert after_hole == [], f"sent across the hole {first + 1}..: {after_hole} of {later}"
        # And it serves again: y reconnects to it and is online for everyone.
        y = await connect(paused, "AI_Node_y", issued["AI_Node_y"])
        await x.joined("AI_Node_y")
        assert await db_online(replica_url, "AI_Node_y") is True
        await x.close()
        await y.close()


async def scrape(port: int, metric: str) -> float:
    """`metric`'s value on the replica serving /metrics on `port` (0 if not there yet)."""

    def page() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as got:
            return str(got.read().decode())

    for line in (await asyncio.to_thread(page)).splitlines():
        if line.startswith(metric + " "):
            return float(line.split()[-1])
    return 0.0


async def _batches(port: int) -> float:
    """How many group commits the replica serving /metrics on `port` has made."""
    return await scrape(port, "kernelhub_commit_batch_size_count")


async def leader_row(url: str) -> str | None:
    """The replica holding a live leader lease, if any (by the database's clock)."""
    async with await psycopg.AsyncConnection.connect(_conninfo(url)) as db:
        row = await (
            await db.execute("SELECT replica_id FROM leader WHERE expires_at > now()")
        ).fetchone()
    return None if row is None else str(row[0])


async def test_deadline_expiry_runs_on_the_leader_only(replica_url: str) -> None:
    """Idle replicas commit nothing but the reaper's batches (every 0.1 s): the leader's
    count grows, the other's stays still; when the leader dies, the other takes over.
    A window in which leadership moved (a stall on a loaded machine outlasting the lease) proves nothing either way: it is tried again, a few times."""
    ports = free_ports(2)
    hubs = [
        TestHub.subprocess(
            replica_url,
            args=["--replica", "true", *FAST, "--metrics-port", str(port)],
            env={"KERNELHUB_LOG_LEVEL": "WARNING"},
            name=f"replica{i}",
        )
        for i, port in enumerate(ports)
    ]
    try:
        await asyncio.gather(*(h.start() for h in hubs))

        async def a_leader() -> str:
            while (holder := await leader_row(replica_url)) is None:  # noqa: ASYNC110 (the db)
                await asyncio.sleep(0.05)
            return holder

        for _ in range(5):
            holder = await asyncio.wait_for(a_leader(), float(LEASE) * 2 + WAIT)
            before = [await _batches(p) for p in ports]
            await asyncio.sleep(2.0)  # a window of ~20 reaper rounds
            grown = [await _batches(p) - b for p, b in zip(ports, before, strict=True)]
            if await leader_row(replica_url) == holder:
                break
        else:
            pytest.fail("leadership moved in every window")
        assert sorted(grown)[0] == 0 and sorted(grown)[1] >= 5, grown
        leader = grown.index(max(grown))
        other = 1 - leader
        await hubs[leader].kill()

        async def takes_over() -> None:
            start = await _batches(ports[other])
            while await _batches(ports[other]) < start + 5:  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.1)

        await asyncio.wait_for(takes_over(), float(LEASE) * 4 + WAIT)
    finally:
        for h in hubs:
            await h.close()


async def test_retention_prunes_across_replicas_and_loses_nothing_owed(
    replica_url: str,
) -> None:
    """Slow readers on either replica pin what they have not yet received while the leader
    prunes hard (keep 8 events): each gets every event it is
    entitled to, exactly once, in order; and behind them the log is pruned."""
    names = ["AI_Node_1", "AI_Node_2", "AI_Node_s", "AI_Node_o"]
    retention = (
        "--event-retention",
        "0",
        "--event-retention-max-events",
        "8",
        "--retention-batch-size",
        "16",
        "--retention-interval",
        "0.1",
        "--outbound-queue-size",
        "4",
        "--replay-page-size",
        "8",
        "--max-events-per-response",
        "4",
    )
    async with replicas(replica_url, 2, *FAST, *retention, agents=names) as running:
        hubs, issued = running.hubs, running.tokens
        # Connected from the start, reading nothing yet: its queue overflows, so it reads
        # the log (pins it) from where it began.
        replaying = await connect(hubs[1], "AI_Node_2", issued["AI_Node_2"])
        old = await connect(hubs[0], "AI_Node_o", issued["AI_Node_o"])
        before = [r.seq for r in await share_all(old, 30)]
        await old.close()
        slow = await connect(hubs[0], "AI_Node_1", issued["AI_Node_1"], skip_history=True)
        sharer = await connect(hubs[1], "AI_Node_s", issued["AI_Node_s"])
        shares: list[int] = []
        for _ in range(12):
            shares += [r.seq for r in await share_all(sharer, 10)]
            await slow._read_one()  # now and then, a response at a time
        await asyncio.wait_for(wait_for(slow, set(shares)), WAIT * 3)
        await asyncio.wait_for(wait_for(replaying, set(before + shares)), WAIT * 3)

        async def oldest() -> int:
            async with await psycopg.AsyncConnection.connect(_conninfo(replica_url)) as db:
                row = await (await db.execute("SELECT min(seq) FROM event")).fetchone()
            return int(row[0]) if row else 0

        async def pruned_past_their_start() -> None:
            while await oldest() <= slow.welcome.head_seq:  # noqa: ASYNC110 (the database)
                await asyncio.sleep(0.1)

        await asyncio.wait_for(pruned_past_their_start(), WAIT)
        for reader, start in ((slow, slow.welcome.head_seq), (replaying, 0)):
            got = [e.seq for e in reader.events if e.seq <= shares[-1]]
            assert got == sorted(set(got)), f"{reader.agent_id}: duplicates or disorder"
            shared = [e.seq for e in reader.events if e.HasField("artifact_shared")]
            expected = [s for s in before + shares if s > start]
            assert shared == expected, f"{reader.agent_id}: lost {set(expected) - set(shared)}"
        for trainer in (slow, replaying, sharer):
            await trainer.close()


async def test_a_component_shared_on_one_replica_wakes_a_validator_on_another(
    replica_url: str,
) -> None:
    ports = free_ports(2)
    async with replicas(replica_url, 2, agents=["AI_Node_v"], metrics_ports=ports) as running:
        (a_hub, b_hub), issued = running.hubs, running.tokens
        validator = await b_hub.issue_token("v1", role=Role.VALIDATOR)
        # Waits up to 30 s unless woken; the call gives up after WAIT (less): only a wake
        # answers it in time.
        claim = asyncio.ensure_future(
            async_stub(b_hub.channel()).ClaimValidation(
                pb.ClaimValidationRequest(wait_seconds=30), metadata=auth(validator), timeout=WAIT
            )
        )

        async def claim_waits() -> None:  # it found nothing: B says it waits
            while await scrape(ports[1], "kernelhub_validation_claims_waiting") < 1:
                assert not claim.done(), claim
                await asyncio.sleep(0.05)

        await asyncio.wait_for(claim_waits(), WAIT)
        sharer = await connect(a_hub, "AI_Node_v", issued["AI_Node_v"])
        receipt = await sharer.receipt(
            await sharer.send(
                share_code_component=pb.ShareCodeComponent(code_component=code_component())
            )
        )
        answer = await claim
        assert answer.lease.artifact.artifact_id == receipt.resource_id
        await sharer.close()


async def test_lease_renewals_do_not_queue_behind_reads(replica_url: str) -> None:
    """Every reader thread busy (a connect storm's token reads, say): a renewal still goes
    through at once, on its own thread and connection, while those reads are running."""
    from sqlalchemy import text

    from hub_service.sql_store import SqlStore
    from hub_service.sql_write import SharedLog

    store = SqlStore(replica_url, writer="thread", reader_threads=2, shared=SharedLog("r1"))
    await store.open()
    try:
        await store.register_replica("r1", 5.0, WAIT)
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def block(s: object) -> None:  # holds a reader thread until told (or its deadline)
            while not release.is_set():
                s.execute(text("SELECT pg_sleep(0.05)"))  # type: ignore[attr-defined]

        busy = [asyncio.ensure_future(store._read(block)) for _ in range(4)]
        try:
            held, _ = await asyncio.wait_for(store.renew_leases("r1", 5.0, 0, WAIT), WAIT)
            assert held and not any(b.done() for b in busy)
        finally:
            loop.call_soon_threadsafe(release.set)
            await asyncio.wait_for(asyncio.gather(*busy), WAIT)
    finally:
        await store.close()


async def test_agent_online_needs_a_live_lease_and_the_leader_sweeps_orphans(
    replica_url: str,
) -> None:
    """A replica whose lease row lapsed may not bring an agent online (the leader may have
    marked its agents offline already); and an agent left online on a replica with no lease
    row at all (dropped) is marked offline by the leader's sweep, which no expiry finds."""
    from hub_service import commands as cmd
    from hub_service.errors import StatusError
    from hub_service.outcomes import Outcome
    from hub_service.sql_store import SqlStore
    from hub_service.sql_write import SharedLog

    from .conftest import hello

    stores = [SqlStore(replica_url, writer="thread", shared=SharedLog(r)) for r in ("r1", "r2")]
    for store in stores:
        await store.open()
    one, two = stores
    try:
        for replica_id, store in zip(("r1", "r2"), stores, strict=True):
            await store.register_replica(replica_id, 30.0, WAIT)
        [online] = await one.commit([cmd.AgentOnline("AI_Node_a", hello("AI_Node_a"))])
        assert isinstance(online, Outcome), online
        async with await psycopg.AsyncConnection.connect(
            _conninfo(replica_url), autocommit=True
        ) as db:
            await db.execute("DELETE FROM replica WHERE replica_id = 'r1'")
        [refused] = await one.commit([cmd.AgentOnline("AI_Node_b", hello("AI_Node_b"))])
        assert isinstance(refused, StatusError) and refused.code == grpc.StatusCode.UNAVAILABLE
        assert await db_online(replica_url, "AI_Node_b") is None
        # No expired lease row carries AI_Node_a: only the sweep finds it.
        [plain] = await two.commit([cmd.ExpireReplicas()])
        assert isinstance(plain, Outcome) and await db_online(replica_url, "AI_Node_a") is True
        [swept] = await two.commit([cmd.ExpireReplicas(orphans=True)])
        assert isinstance(swept, Outcome) and not swept.more
        assert await db_online(replica_url, "AI_Node_a") is False
    finally:
        for store in stores:
            await store.close()


async def test_the_leader_marks_offline_an_agent_online_on_no_replica(replica_url: str) -> None:
    """A row left online on a replica that has no lease row (as a replica dropped while a
    late AgentOnline of its committed would leave it): the leader's sweep, once per lease,
    marks it offline through the usual path, and the others hear it leave."""
    names = ["AI_Node_x", "AI_Node_y"]
    async with replicas(replica_url, 2, *FAST, agents=names) as running:
        (a_hub, b_hub), issued = running.hubs, running.tokens
        x = await connect(a_hub, "AI_Node_x", issued["AI_Node_x"])
        y = await connect(b_hub, "AI_Node_y", issued["AI_Node_y"])
        await x.joined("AI_Node_y")
        async with await psycopg.AsyncConnection.connect(
            _conninfo(replica_url), autocommit=True
        ) as db:
            await db.execute("UPDATE agent SET replica_id = 'gone' WHERE agent_id = 'AI_Node_y'")
        await asyncio.wait_for(x.left("AI_Node_y"), float(LEASE) * 2 + WAIT)
        assert await db_online(replica_url, "AI_Node_y") is False
        await x.close()
        await y.close()

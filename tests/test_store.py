"""The SQL store's own promises (restarts, the bulk path below the ORM, PostgreSQL's
quirks) and whole hubs on PostgreSQL and on the in-memory store (`memory://`), in process
and from the CLI. What every store promises is in test_store_contract.py."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.bulk import BulkWriter
from hub_service.memory_store import MemoryStore
from hub_service.models import AgentRow, ArtifactRow, EventRow, ReceivedMessageRow
from hub_service.roles import Role
from hub_service.server import HubServer
from hub_service.sql_store import SqlStore
from hub_service.state import Principal

from .conftest import WAIT, HubHarness, free_port, hello, make_config, pattern
from .test_store_contract import (
    NET,
    SEC,
    artifact_count,
    commit_ok,
    online,
    request_feature,
    share,
    share_as,
    subscription,
)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url, writer="thread")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --- restarts ---------------------------------------------------------------------------------------


async def test_reopening_keeps_data_and_continues_the_seq(store_url: str) -> None:
    first = SqlStore(store_url, writer="thread")
    await first.open()
    try:
        await commit_ok(first, [online("a")])
        old = await commit_ok(first, [share("a", "s1"), request_feature("a", "f1")])
        token = (await first.issue_token("a")).token
    finally:
        await first.close()

    second = SqlStore(store_url, writer="thread")
    await second.open()
    try:
        assert await second.head_seq() == old[-1].seq
        assert [a.artifact_id for a in (await second.list_artifacts(0, 0, "", 10, "")).items] == [
            old[0].resource_id
        ]
        assert await second.authenticate(token) == Principal("a", Role.AGENT)
        [dup] = await commit_ok(second, [share("a", "s1")])
        assert dup.duplicate and dup.resource_id == old[0].resource_id
        [new] = await commit_ok(second, [share("a", "s2", "p2")])
        assert new.seq == old[-1].seq + 1
        assert new.seq == 3  # presence takes no seq
        assert [e.seq for e in await second.events_for("b", 0, 10)] == [1, 2, 3]
        assert [e.seq for e in await second.events_for("a", 0, 10)] == []  # all its own
    finally:
        await second.close()


# --- whole hubs on PostgreSQL and in memory ------------------------------------------------------------------------


@pytest.fixture
async def pg_harness(postgres_url: str) -> AsyncIterator[HubHarness]:
    async for harness in _harness(postgres_url):
        yield harness


@pytest.fixture
async def memory_harness() -> AsyncIterator[HubHarness]:
    async for harness in _harness("memory://"):
        yield harness


async def _harness(database_url: str) -> AsyncIterator[HubHarness]:
    server = HubServer(make_config(database_url))
    await server.start()
    harness = HubHarness(server)
    try:
        yield harness
    finally:
        await harness.close()
        await server.stop()


async def test_a_hub_on_postgres_serves_a_share_end_to_end(pg_harness: HubHarness) -> None:
    await _serves_a_share_end_to_end(pg_harness)


async def test_a_hub_in_memory_serves_a_share_end_to_end(memory_harness: HubHarness) -> None:
    assert isinstance(memory_harness.server.store, MemoryStore)
    await _serves_a_share_end_to_end(memory_harness)


async def _serves_a_share_end_to_end(pg_harness: HubHarness) -> None:
    sender = await pg_harness.connect("AI_Node_1")
    peer = await pg_harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    receipt = await sender.receipt(
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern()))
    )
    assert receipt.seq > 0 and receipt.resource_id.startswith("art_")
    event = await peer.event("artifact_shared", artifact_id=receipt.resource_id)
    assert event.seq == receipt.seq and event.artifact_shared.contributor_id == "AI_Node_1"
    stored = await pg_harness.query(
        "GetArtifact", pb.GetArtifactRequest(artifact_id=receipt.resource_id)
    )
    assert stored.artifact == event.artifact_shared
    stats = await pg_harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert stats.knowledge_base.pattern_count == 1 and stats.agents_online == 2


async def test_a_nul_character_in_free_text_is_not_an_internal_error_on_postgres(
    pg_harness: HubHarness,
) -> None:
    a = await pg_harness.connect("AI_Node_1")
    await pg_harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    mid = await a.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_2",
            type=pb.COLLABORATION_TYPE_CODE_REVIEW,
            description="review\x00this",
        )
    )
    answer = await a.answer(mid)
    assert isinstance(answer, pb.Receipt) or answer.code == 3, f"got {answer}"


# --- the bulk path below the ORM ------------------------------------------------------------


async def test_bulk_inserted_rows_read_back_like_orm_written_ones(store: SqlStore) -> None:
    """Events, artifacts and the ledger skip the ORM; their columns must still hold exactly
    what the ORM writes (the agent row is ORM-written in the same transaction)."""
    [_, shared] = await commit_ok(store, [online("a"), share("a", "m1")])
    with store._session() as session:
        agent = session.get(AgentRow, "a")
        artifact = session.get(ArtifactRow, shared.resource_id)
        ledger = session.get(ReceivedMessageRow, ("a", "m1"))
        event = session.get(EventRow, shared.seq)
        assert agent is not None and artifact is not None and ledger is not None
        assert event is not None
        assert artifact.created_at == ledger.created_at == event.created_at == agent.last_seen_at
        assert (artifact.seq, artifact.contributor_id, artifact.kind) == (
            shared.seq,
            "a",
            pb.ARTIFACT_KIND_PATTERN,
        )
        assert (ledger.seq, ledger.resource_id) == (shared.seq, shared.resource_id)
        assert event.broadcast and event.sender_id == "a"
        if store.database_url.startswith("sqlite"):  # the very same text, not just equal values
            raw = session.connection().exec_driver_sql
            [(orm_text,)] = raw("SELECT last_seen_at FROM agent").all()
            [(bulk_text,)] = raw("SELECT created_at FROM artifact").all()
            assert bulk_text == orm_text


async def test_duplicates_are_found_across_lookup_chunks_and_agents(store: SqlStore) -> None:
    keys = [(f"agent{i % 3}", f"m{i}") for i in range(BulkWriter.LOOKUP_CHUNK * 2 + 7)]
    first = await commit_ok(store, [share(agent, mid) for agent, mid in keys])
    again = await commit_ok(store, [share(agent, mid) for agent, mid in reversed(keys)])
    assert all(o.duplicate for o in again) and not any(o.duplicate for o in first)
    assert [(o.seq, o.resource_id) for o in reversed(again)] == [
        (o.seq, o.resource_id) for o in first
    ]
    assert await artifact_count(store) == len(keys)


async def test_the_ledger_lookup_uses_the_primary_key_on_sqlite(tmp_path: Path) -> None:
    """A row-value IN reads the same but SQLite scans the whole ledger for it (200 µs per
    key at 200k rows): the lookup must be an index search whatever the ledger's size."""
    store = SqlStore(f"sqlite:///{tmp_path / 'plan.db'}", writer="thread")
    await store.open()
    try:
        sql = BulkWriter(store._engine.dialect).ledger_query(3)
        with store._session() as session:
            plan = session.connection().exec_driver_sql(
                "EXPLAIN QUERY PLAN " + sql, ("a", "1", "b", "2", "c", "3")
            )
            details = [str(row[-1]) for row in plan]
        assert any("USING INDEX" in d or "USING PRIMARY KEY" in d for d in details), details
        assert not any(d.startswith("SCAN received_message") for d in details), details
    finally:
        await store.close()


async def test_the_cli_serves_an_ephemeral_hub_in_memory(tmp_path: Path) -> None:
    """`kernelhub-hub serve --database-url memory://` starts, answers health, and keeps no
    file: not the default ./kernelhub.db, nothing in its working directory."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database-url",
        "memory://",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KERNELHUB_LOG_LEVEL": "WARNING"},
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        if not line.startswith(b"kernelhub serving on"):
            process.kill()
            _, err = await asyncio.wait_for(process.communicate(), WAIT)
            pytest.fail(f"the hub did not start: {line!r} {err.decode()[-2000:]}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 60) == 0
        assert os.listdir(tmp_path) == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_second_writer_on_the_same_file_retags_the_first_ones_shares(
    tmp_path: Path,
) -> None:
    """Two hubs on one SQLite file (nothing refuses it): the first keeps its senders'
    specializations between commits, and must notice that the second changed one."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    first, second = SqlStore(url, writer="thread"), SqlStore(url, writer="thread")
    await first.open()
    await second.open()
    try:
        unspecified = pb.SPECIALIZATION_UNSPECIFIED
        await commit_ok(first, [online("a", NET), share_as("a", "s1", unspecified)])
        await commit_ok(first, [share_as("a", "s2", unspecified)])  # from the cache
        await commit_ok(second, [online("a", SEC)])
        await commit_ok(first, [share_as("a", "s3", unspecified)])
        for spec, seqs in ((NET, [1, 2]), (SEC, [3])):
            events = await first.events_for(
                "c", 0, 100, subscription=subscription(specializations=[spec])
            )
            assert [e.seq for e in events] == seqs, spec
    finally:
        await first.close()
        await second.close()


async def test_the_writer_never_joins_a_transaction_left_open_on_its_connection(
    tmp_path: Path,
) -> None:
    """A session on a connection already in a transaction joins it, and its commit then
    COMMITs nothing: a commit would be acknowledged and never stored. Nothing leaves one
    open today (the writer keeps its connection between commits on SQLite); the writer
    does not trust that."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    store = SqlStore(url, writer="thread")
    await store.open()
    try:
        await commit_ok(store, [online("a")])
        kept = store.sql_writer._connection
        assert kept is not None
        kept.execute(text("select 1"))  # autobegins, and is left open
        await commit_ok(store, [online("b")])
    finally:
        await store.close()
    reader = create_engine(url)
    try:
        with reader.connect() as connection:
            stored = connection.execute(text("select agent_id from agent order by 1")).all()
        assert [row[0] for row in stored] == ["a", "b"]
    finally:
        reader.dispose()


async def test_closing_a_store_lets_go_of_the_writers_connection(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'hub.db'}", writer="thread")
    await store.open()
    await commit_ok(store, [online("a")])
    assert store.sql_writer._connection is not None
    await store.close()
    assert store.sql_writer._connection is None

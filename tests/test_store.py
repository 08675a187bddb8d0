"""SqlStore on SQLite and PostgreSQL: group commit, idempotency, entitlement, paging, tokens, restarts."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import commands as cmd
from hub_service.bulk import BulkWriter
from hub_service.collaboration import Policy, Step
from hub_service.errors import HubError
from hub_service.models import AgentRow, ArtifactRow, EventRow, ReceivedMessageRow
from hub_service.server import HubServer
from hub_service.store import Page, SqlStore

from .conftest import HubHarness, hello, make_config, os_component, pattern


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


# --- helpers ----------------------------------------------------------------------------


def share(agent: str, message_id: str, pattern_id: str = "p1") -> cmd.ShareArtifact:
    return cmd.ShareArtifact(
        agent, message_id, pb.Artifact(kind=pb.ARTIFACT_KIND_PATTERN, pattern=pattern(pattern_id))
    )


def share_os(agent: str, message_id: str) -> cmd.ShareArtifact:
    return cmd.ShareArtifact(
        agent,
        message_id,
        pb.Artifact(kind=pb.ARTIFACT_KIND_OS_COMPONENT, os_component=os_component()),
    )


def online(
    agent: str, spec: int = pb.SPECIALIZATION_NETWORKING, caps: Sequence[str] = ()
) -> cmd.AgentOnline:
    return cmd.AgentOnline(agent, hello(agent, spec, capabilities=list(caps)))


def request_feature(
    agent: str, message_id: str, feature: str = "memory_allocator"
) -> cmd.RequestFeature:
    return cmd.RequestFeature(
        agent,
        message_id,
        pb.RequestFeature(
            feature=feature,
            requirements=pb.FeatureRequirements(
                performance=pb.PERFORMANCE_LEVEL_LOW, priority=pb.PRIORITY_LOW
            ),
        ),
    )


def propose(agent: str, message_id: str, target: str) -> cmd.ProposeCollaboration:
    return cmd.ProposeCollaboration(
        agent,
        message_id,
        pb.ProposeCollaboration(target_agent_id=target, type=pb.COLLABORATION_TYPE_CODE_REVIEW),
    )


async def commit_ok(store: SqlStore, commands: Sequence[Any]) -> list[cmd.Outcome]:
    results = await store.commit(commands)
    assert len(results) == len(commands)
    outcomes = []
    for result in results:
        assert isinstance(result, cmd.Outcome), f"refused: {result}"
        outcomes.append(result)
    return outcomes


async def all_pages(fetch: Any, page_size: int) -> tuple[list[Any], int]:
    """Every item through `fetch(limit, cursor)`, and how many pages it took."""
    items: list[Any] = []
    cursor, pages = "", 0
    while True:
        page: Page = await fetch(page_size, cursor)
        pages += 1
        assert len(page.items) <= page_size
        items += page.items
        if not page.next_cursor:
            return items, pages
        assert page.items, "a page with a next cursor must not be empty"
        cursor = page.next_cursor


async def artifact_count(store: SqlStore) -> int:
    items, _ = await all_pages(
        lambda limit, cursor: store.list_artifacts(0, 0, "", limit, cursor), 500
    )
    return len(items)


# --- group commit -------------------------------------------------------------------------


async def test_a_batch_gets_increasing_seqs(store: SqlStore) -> None:
    assert await store.head_seq() == 0
    outcomes = await commit_ok(
        store,
        [
            online("a"),
            share("a", "m1"),
            share("a", "m2", "p2"),
            request_feature("a", "m3"),
            share_os("a", "m4"),
        ],
    )
    seqs = [o.seq for o in outcomes]
    assert seqs == [1, 2, 3, 4, 5]
    assert [e.event.seq for o in outcomes for e in o.events] == seqs
    assert await store.head_seq() == 5
    assert outcomes[1].resource_id != outcomes[2].resource_id
    assert outcomes[3].resource_id.startswith("feat_")
    more = await commit_ok(store, [share("a", "m5", "p5")])
    assert more[0].seq == 6


async def test_a_refused_command_does_not_sink_its_batch_mates(store: SqlStore) -> None:
    results = await store.commit(
        [
            online("a"),
            share("a", "m1"),
            cmd.CollaborationStep("a", "m2", "collab_unknown", Step.ACCEPT),
            propose("a", "m3", "nobody"),
            share("a", "m4", "p4"),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "Outcome",
        "Outcome",
        "HubError",
        "HubError",
        "Outcome",
    ]
    refused = [r for r in results if isinstance(r, HubError)]
    assert [e.code for e in refused] == [grpc.StatusCode.NOT_FOUND] * 2
    assert "collab_unknown" in refused[0].message and "nobody" in refused[1].message
    committed = [r for r in results if isinstance(r, cmd.Outcome)]
    assert [o.seq for o in committed] == [1, 2, 3]
    assert await artifact_count(store) == 2
    # A refused message is not remembered: sending it again is evaluated again.
    again = await store.commit([cmd.CollaborationStep("a", "m2", "collab_unknown", Step.ACCEPT)])
    assert isinstance(again[0], HubError) and again[0].code == grpc.StatusCode.NOT_FOUND


@dataclass
class Poison:
    """A command that breaks the transaction itself (not a HubError)."""

    agent_id: str = "a"
    message_id: str = "poison"
    fingerprint: bytes = b""

    def apply(self, tx: cmd.Tx) -> cmd.Outcome:
        raise RuntimeError("boom")


async def test_a_poisoned_command_is_isolated_and_the_rest_commit(store: SqlStore) -> None:
    results = await store.commit([share("a", "m1"), Poison(), share("a", "m2", "p2")])
    assert isinstance(results[1], HubError) and results[1].code == grpc.StatusCode.INTERNAL
    first, last = results[0], results[2]
    assert isinstance(first, cmd.Outcome) and isinstance(last, cmd.Outcome)
    assert 0 < first.seq < last.seq
    assert await artifact_count(store) == 2
    stored = {a.artifact_id for a in (await store.list_artifacts(0, 0, "", 10, "")).items}
    assert stored == {first.resource_id, last.resource_id}
    assert await store.head_seq() == last.seq


# --- idempotency ------------------------------------------------------------------------------


async def test_same_message_id_is_a_duplicate_stored_once(store: SqlStore) -> None:
    [first] = await commit_ok(store, [share("a", "same")])
    [again] = await commit_ok(store, [share("a", "same", "different")])
    assert again.duplicate and not first.duplicate
    assert (again.seq, again.resource_id) == (first.seq, first.resource_id)
    assert again.events == []  # nothing to route again
    # Twice in one batch, too.
    in_batch = await commit_ok(store, [share("a", "twin"), share("a", "twin", "other")])
    assert [o.duplicate for o in in_batch] == [False, True]
    assert in_batch[0].resource_id == in_batch[1].resource_id
    # Ids are per agent.
    [other] = await commit_ok(store, [share("b", "same")])
    assert not other.duplicate and other.resource_id != first.resource_id
    assert await artifact_count(store) == 3
    assert await store.head_seq() == other.seq


async def test_duplicate_of_a_collaboration_step_keeps_its_session_id(store: SqlStore) -> None:
    await commit_ok(store, [online("a"), online("b")])
    [proposed] = await commit_ok(store, [propose("a", "p", "b")])
    [again] = await commit_ok(store, [propose("a", "p", "b")])
    assert again.duplicate and again.resource_id == proposed.resource_id
    page = await store.list_collaborations("", 0, 10, "")
    assert [c.session_id for c in page.items] == [proposed.resource_id]


# --- the event log -------------------------------------------------------------------------------


async def test_events_for_delivers_only_what_each_agent_is_entitled_to(store: SqlStore) -> None:
    outcomes = await commit_ok(
        store,
        [
            online("a"),
            online("b", pb.SPECIALIZATION_PROCESS_MANAGER, ["memory_management"]),
            online("c", pb.SPECIALIZATION_FILE_SYSTEM, ["file_operations"]),
            share("a", "s1"),  # broadcast from a
            propose("a", "c1", "b"),  # to a and b only
            request_feature("c", "f1"),  # routed to b only
            request_feature("a", "f2", "not_known"),  # broadcast: b and c
            share("b", "s2"),  # broadcast from b
        ],
    )
    expected: dict[str, list[int]] = {"a": [], "b": [], "c": [], "d": []}
    for outcome in outcomes:
        for routed in outcome.events:
            for agent in expected:
                if routed.recipients is None:
                    entitled = agent != routed.event.sender_id
                else:
                    entitled = agent in routed.recipients
                if entitled:
                    expected[agent].append(routed.event.seq)
    # Sanity: the scenario exercises every rule.
    assert expected["a"] == [2, 3, 5, 8]
    assert expected["b"] == [1, 3, 4, 5, 6, 7]
    assert expected["c"] == [1, 2, 4, 7, 8]
    # An agent that never said hello still gets broadcasts.
    assert expected["d"] == [1, 2, 3, 4, 7, 8]

    for agent, seqs in expected.items():
        events = await store.events_for(agent, 0, 100)
        assert [e.seq for e in events] == seqs, agent
    b_events = await store.events_for("b", 0, 100)
    assert [e.WhichOneof("body") for e in b_events] == [
        "agent_joined",
        "agent_joined",
        "artifact_shared",
        "collaboration_updated",
        "feature_requested",
        "feature_requested",
    ]
    assert b_events[4].sender_id == "c"
    assert list(b_events[4].feature_requested.request.routed_to) == ["b"]

    # limit and after_seq page through the same sequence.
    assert [e.seq for e in await store.events_for("b", 0, 2)] == [1, 3]
    assert [e.seq for e in await store.events_for("b", 3, 2)] == [4, 5]
    assert [e.seq for e in await store.events_for("b", 7, 10)] == []
    assert [e.seq for e in await store.events_for("c", 2, 100)] == [4, 7, 8]


async def test_hub_raised_events_reach_both_partners(store_url: str) -> None:
    store = SqlStore(
        store_url,
        policy=Policy(proposal_ttl=timedelta(seconds=-1)),  # already due
    )
    await store.open()
    try:
        await commit_ok(store, [online("a"), online("b"), online("c")])
        [proposed] = await commit_ok(store, [propose("a", "p", "b")])
        [expired] = await commit_ok(store, [cmd.ExpireDue()])
        assert expired.seq == proposed.seq + 1
        for agent, entitled in (("a", True), ("b", True), ("c", False)):
            seqs = [e.seq for e in await store.events_for(agent, proposed.seq, 10)]
            assert seqs == ([expired.seq] if entitled else []), agent
        [event] = await store.events_for("a", proposed.seq, 10)
        assert event.sender_id == ""
        assert event.collaboration_updated.collaboration.state == pb.COLLABORATION_STATE_EXPIRED
        page = await store.list_collaborations("", pb.COLLABORATION_STATE_EXPIRED, 10, "")
        assert [c.session_id for c in page.items] == [proposed.resource_id]
    finally:
        await store.close()


# --- pagination ----------------------------------------------------------------------------------


async def test_every_list_pages_through_everything_once(store: SqlStore) -> None:
    agents = [f"agent_{i}" for i in range(5)]
    await commit_ok(store, [online(a) for a in agents])
    await commit_ok(store, [cmd.AgentOffline("agent_1"), cmd.AgentOffline("agent_3")])
    shares = await commit_ok(
        store,
        [share(agents[i % 2], f"s{i}", f"p{i}") for i in range(7)] + [share_os("agent_2", "os")],
    )
    requests = await commit_ok(store, [request_feature(agents[i % 3], f"f{i}") for i in range(6)])
    proposals = await commit_ok(
        store, [propose("agent_0", f"c{i}", agents[1 + i % 4]) for i in range(5)]
    )

    for size in (1, 2, 3, 500):
        artifacts, pages = await all_pages(
            lambda limit, cursor: store.list_artifacts(0, 0, "", limit, cursor), size
        )
        ids = [a.artifact_id for a in artifacts]
        assert ids == [o.resource_id for o in reversed(shares)], size  # newest first, no gaps
        assert pages == -(-len(shares) // size)  # the last full page says there is no more

        mine, _ = await all_pages(
            lambda limit, cursor: store.list_artifacts(0, 0, "agent_0", limit, cursor), size
        )
        assert [a.artifact_id for a in mine] == [o.resource_id for o in reversed(shares[0:7:2])]

        features, _ = await all_pages(
            lambda limit, cursor: store.list_feature_requests("", limit, cursor), size
        )
        assert [f.request_id for f in features] == [o.resource_id for o in reversed(requests)]

        sessions, _ = await all_pages(
            lambda limit, cursor: store.list_collaborations("", 0, limit, cursor), size
        )
        session_ids = [c.session_id for c in sessions]
        assert sorted(session_ids) == sorted(o.resource_id for o in proposals)
        assert session_ids == sorted(session_ids, reverse=True)

        listed, _ = await all_pages(
            lambda limit, cursor: store.list_agents(False, limit, cursor), size
        )
        assert [(a.agent_id, a.online) for a in listed] == [
            ("agent_0", True),
            ("agent_2", True),
            ("agent_4", True),
            ("agent_1", False),
            ("agent_3", False),
        ]
        online_only, _ = await all_pages(
            lambda limit, cursor: store.list_agents(True, limit, cursor), size
        )
        assert [a.agent_id for a in online_only] == ["agent_0", "agent_2", "agent_4"]

    kinds = await store.list_artifacts(pb.ARTIFACT_KIND_OS_COMPONENT, 0, "", 10, "")
    assert [a.artifact_id for a in kinds.items] == [shares[-1].resource_id]
    by_spec = await store.list_artifacts(0, pb.SPECIALIZATION_SECURITY, "", 10, "")
    assert by_spec.items == []
    with_agent_1 = await store.list_collaborations("agent_1", 0, 10, "")
    assert sorted(c.session_id for c in with_agent_1.items) == sorted(
        [proposals[0].resource_id, proposals[4].resource_id]
    )
    assert {c.target_id for c in with_agent_1.items} == {"agent_1"}
    proposed = await store.list_collaborations("", pb.COLLABORATION_STATE_PROPOSED, 10, "")
    assert len(proposed.items) == 5
    assert (await store.list_collaborations("", pb.COLLABORATION_STATE_ACTIVE, 10, "")).items == []
    by_requester = await store.list_feature_requests("agent_1", 10, "")
    assert [f.requester_id for f in by_requester.items] == ["agent_1", "agent_1"]


async def test_collaborations_are_listed_newest_first(database_url: str) -> None:
    # SQLite only: it is fast enough that consecutive proposals share a millisecond (a
    # PostgreSQL round trip usually takes longer, which hides the bug there).
    store = SqlStore(
        database_url,
        policy=Policy(
            max_open_per_agent=10_000, max_open_per_pair=10_000, max_incoming_proposals=10_000
        ),
    )
    await store.open()
    try:
        await commit_ok(store, [online("a"), online("b")])
        created: list[str] = []
        for _ in range(20):
            batch = [propose("a", f"p{len(created) + i}", "b") for i in range(50)]
            created += [o.resource_id for o in await commit_ok(store, batch)]
            # Stop once two consecutive sessions share a millisecond (the 12 hex digits after
            # "collab_") and their random tails sort the other way round.
            if any(x[:19] == y[:19] and x > y for x, y in itertools.pairwise(created)):
                break
        listed, _ = await all_pages(
            lambda limit, cursor: store.list_collaborations("", 0, limit, cursor), 100
        )
        assert [c.session_id for c in listed] == list(reversed(created))
    finally:
        await store.close()


# --- tokens --------------------------------------------------------------------------------------


async def test_token_lifecycle(store: SqlStore) -> None:
    issued = await store.issue_token("AI_Node_1")
    assert issued.token.startswith("kh_") and issued.expires_at is None
    assert await store.authenticate(issued.token) == "AI_Node_1"
    assert await store.authenticate(issued.token + "x") is None
    assert await store.authenticate("") is None

    second = await store.issue_token("AI_Node_1", ttl=timedelta(hours=1))
    other = await store.issue_token("AI_Node_2")
    assert await store.authenticate(second.token) == "AI_Node_1"
    rows = await store.list_tokens()
    assert {r.token_id for r in rows} == {issued.token_id, second.token_id, other.token_id}
    assert all(r.token_hash not in (issued.token, second.token, other.token) for r in rows)

    # Revoking one token by id leaves the agent's other tokens alone.
    assert await store.revoke_tokens(issued.token_id) == 1
    assert await store.authenticate(issued.token) is None
    assert await store.authenticate(second.token) == "AI_Node_1"
    # Revoking by agent revokes the rest of that agent's tokens only.
    assert await store.revoke_tokens("AI_Node_1") == 1
    assert await store.authenticate(second.token) is None
    assert await store.authenticate(other.token) == "AI_Node_2"
    assert await store.revoke_tokens("AI_Node_1") == 0

    expired = await store.issue_token("AI_Node_3", ttl=timedelta(seconds=-1))
    assert expired.expires_at is not None
    assert await store.authenticate(expired.token) is None


# --- stats -----------------------------------------------------------------------------------------


async def test_stats_count_what_is_stored(store: SqlStore) -> None:
    await commit_ok(store, [online("a"), online("b", caps=["memory_management"]), online("c")])
    await commit_ok(store, [cmd.AgentOffline("c")])
    await commit_ok(store, [share("a", "s1"), share("a", "s2", "p2"), share_os("b", "o1")])
    [req] = await commit_ok(store, [request_feature("a", "f1")])
    [delivered] = await commit_ok(
        store,
        [
            cmd.DeliverFeature(
                "b", "d1", pb.DeliverFeature(request_id=req.resource_id, component=os_component())
            )
        ],
    )
    [p1, p2] = await commit_ok(store, [propose("a", "c1", "b"), propose("b", "c2", "c")])
    await commit_ok(store, [cmd.CollaborationStep("b", "acc", p1.resource_id, Step.ACCEPT)])

    stats = await store.stats()
    assert stats.agents_known == 3
    assert stats.agents_online == 2
    assert stats.feature_delivery_count == 1
    assert dict(stats.collaborations_by_state) == {
        "COLLABORATION_STATE_ACTIVE": 1,
        "COLLABORATION_STATE_PROPOSED": 1,
    }
    assert stats.head_seq == await store.head_seq()
    kb = stats.knowledge_base
    assert (kb.pattern_count, kb.code_component_count, kb.os_component_count) == (2, 0, 2)
    assert kb.feature_request_count == 1
    assert list(kb.recent_artifacts) == []

    recent = await store.knowledge_base(recent=2)
    assert recent.recent_artifacts[0].artifact_id == delivered.resource_id
    assert len(recent.recent_artifacts) == 2
    requests = await store.list_feature_requests("", 10, "")
    assert requests.items[0].delivery_count == 1
    assert p2.resource_id != p1.resource_id


# --- restarts ---------------------------------------------------------------------------------------


async def test_reopening_keeps_data_and_continues_the_seq(store_url: str) -> None:
    first = SqlStore(store_url)
    await first.open()
    try:
        await commit_ok(first, [online("a")])
        old = await commit_ok(first, [share("a", "s1"), request_feature("a", "f1")])
        token = (await first.issue_token("a")).token
    finally:
        await first.close()

    second = SqlStore(store_url)
    await second.open()
    try:
        assert await second.head_seq() == old[-1].seq
        assert [a.artifact_id for a in (await second.list_artifacts(0, 0, "", 10, "")).items] == [
            old[0].resource_id
        ]
        assert await second.authenticate(token) == "a"
        [dup] = await commit_ok(second, [share("a", "s1")])
        assert dup.duplicate and dup.resource_id == old[0].resource_id
        [new] = await commit_ok(second, [share("a", "s2", "p2")])
        assert new.seq == old[-1].seq + 1
        assert new.seq == 4
        assert [e.seq for e in await second.events_for("b", 0, 10)] == [1, 2, 3, 4]
        assert [e.seq for e in await second.events_for("a", 0, 10)] == []  # all its own
    finally:
        await second.close()


# --- a whole hub on PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
async def pg_harness(postgres_url: str) -> AsyncIterator[HubHarness]:
    server = HubServer(make_config(postgres_url))
    await server.start()
    harness = HubHarness(server)
    try:
        yield harness
    finally:
        await harness.close()
        await server.stop()


async def test_a_hub_on_postgres_serves_a_share_end_to_end(pg_harness: HubHarness) -> None:
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
    store = SqlStore(f"sqlite:///{tmp_path / 'plan.db'}")
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

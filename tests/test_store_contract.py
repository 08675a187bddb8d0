"""The store contract, one suite for every store: the in-memory store, SQLite and
PostgreSQL (group commit, idempotency, entitlement, paging, tokens, stats)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import commands as cmd
from hub_service.collaboration import Policy, Step
from hub_service.errors import StatusError
from hub_service.memory_store import MemoryStore
from hub_service.models import utcnow
from hub_service.outcomes import Outcome
from hub_service.roles import Role
from hub_service.sql_store import SqlStore
from hub_service.state import HubStore, Page, Principal, StateTx
from hub_service.subscriptions import Filter
from hub_service.tokens import hash_token

from .conftest import hello, os_component, pattern

OpenStore = Callable[..., AbstractAsyncContextManager[HubStore]]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> OpenStore:
    """Opens a fresh store of the kind under test (with a policy, if given)."""
    if store_kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    elif store_kind == "postgres":
        url = str(request.getfixturevalue("postgres_url"))

    @contextlib.asynccontextmanager
    async def opened(policy: Policy | None = None) -> AsyncIterator[HubStore]:
        store: HubStore = (
            MemoryStore(policy)
            if store_kind == "memory"
            else SqlStore(url, writer="thread", policy=policy)
        )
        await store.open()
        try:
            yield store
        finally:
            await store.close()

    return opened


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[HubStore]:
    async with open_store() as s:
        yield s


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


async def commit_ok(store: HubStore, commands: Sequence[Any]) -> list[Outcome]:
    results = await store.commit(commands)
    assert len(results) == len(commands)
    outcomes = []
    for result in results:
        assert isinstance(result, Outcome), f"refused: {result}"
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


async def artifact_count(store: HubStore) -> int:
    items, _ = await all_pages(
        lambda limit, cursor: store.list_artifacts(0, 0, "", limit, cursor), 500
    )
    return len(items)


# --- group commit -------------------------------------------------------------------------


async def test_a_batch_gets_increasing_seqs(store: HubStore) -> None:
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
    # Presence is state, not an event: the connect takes no seq.
    assert seqs == [0, 1, 2, 3, 4]
    assert outcomes[0].events == [] and outcomes[0].agent is not None
    assert [e.event.seq for o in outcomes for e in o.events] == seqs[1:]
    assert await store.head_seq() == 4
    assert outcomes[1].resource_id != outcomes[2].resource_id
    assert outcomes[3].resource_id.startswith("feat_")
    more = await commit_ok(store, [share("a", "m5", "p5")])
    assert more[0].seq == 5


async def test_a_refused_command_does_not_sink_its_batch_mates(store: HubStore) -> None:
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
        "StatusError",
        "StatusError",
        "Outcome",
    ]
    refused = [r for r in results if isinstance(r, StatusError)]
    assert [e.code for e in refused] == [grpc.StatusCode.NOT_FOUND] * 2
    assert "collab_unknown" in refused[0].message and "nobody" in refused[1].message
    committed = [r for r in results if isinstance(r, Outcome)]
    assert [o.seq for o in committed] == [0, 1, 2]  # presence takes no seq
    assert await artifact_count(store) == 2
    # A refused message is not remembered: sending it again is evaluated again.
    again = await store.commit([cmd.CollaborationStep("a", "m2", "collab_unknown", Step.ACCEPT)])
    assert isinstance(again[0], StatusError) and again[0].code == grpc.StatusCode.NOT_FOUND


@dataclass
class Poison:
    """A command that breaks the transaction itself (not a StatusError)."""

    agent_id: str = "a"
    message_id: str = "poison"
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        raise RuntimeError("boom")


async def test_a_poisoned_command_is_isolated_and_the_rest_commit(store: HubStore) -> None:
    head = await store.head_seq()
    results = await store.commit([share("a", "m1"), Poison(), share("a", "m2", "p2")])
    assert isinstance(results[1], StatusError) and results[1].code == grpc.StatusCode.INTERNAL
    first, last = results[0], results[2]
    assert isinstance(first, Outcome) and isinstance(last, Outcome)
    assert 0 < first.seq < last.seq
    assert await artifact_count(store) == 2
    stored = {a.artifact_id for a in (await store.list_artifacts(0, 0, "", 10, "")).items}
    assert stored == {first.resource_id, last.resource_id}
    assert await store.head_seq() == last.seq
    # The failed batch's seqs were rolled back with it: the retried commands take them.
    assert (first.seq, last.seq) == (head + 1, head + 2), "a gap in the log"


async def test_a_failed_commit_leaves_no_gap_in_the_log(store: HubStore) -> None:
    """Whatever a failed transaction allocated goes to the next one: `db check` finds the
    log running 1..head."""
    [before] = await commit_ok(store, [share("a", "g1")])
    await store.commit([share("a", "g2"), Poison()])  # fails whole, then one by one
    [after] = await commit_ok(store, [share("a", "g3")])
    page = await store.events_for("b", 0, 10)
    assert [e.seq for e in page] == list(range(before.seq, after.seq + 1)) == [1, 2, 3]


# --- idempotency ------------------------------------------------------------------------------


async def test_a_message_id_reused_for_another_body_is_refused(store: HubStore) -> None:
    """Fingerprints differ: ALREADY_EXISTS naming the first seq; the same body again is a
    duplicate; a command without a fingerprint (a ledger row from before) stays a duplicate."""
    first = share("a", "reused")
    first.fingerprint = b"body-one"
    [ok] = await commit_ok(store, [first])
    other = share("a", "reused", "p2")
    other.fingerprint = b"body-two"
    again = share("a", "reused")
    again.fingerprint = b"body-one"
    unknown = share("a", "reused", "p3")  # no fingerprint: not compared
    refused, duplicate, plain = await store.commit([other, again, unknown])
    assert isinstance(refused, StatusError) and refused.code == grpc.StatusCode.ALREADY_EXISTS
    assert f"seq {ok.seq}" in refused.message
    assert isinstance(duplicate, Outcome) and duplicate.duplicate and duplicate.seq == ok.seq
    assert isinstance(plain, Outcome) and plain.duplicate
    assert await artifact_count(store) == 1


async def test_same_message_id_is_a_duplicate_stored_once(store: HubStore) -> None:
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


async def test_duplicate_of_a_collaboration_step_keeps_its_session_id(store: HubStore) -> None:
    await commit_ok(store, [online("a"), online("b")])
    [proposed] = await commit_ok(store, [propose("a", "p", "b")])
    [again] = await commit_ok(store, [propose("a", "p", "b")])
    assert again.duplicate and again.resource_id == proposed.resource_id
    page = await store.list_collaborations("", 0, 10, "")
    assert [c.session_id for c in page.items] == [proposed.resource_id]


# --- the event log -------------------------------------------------------------------------------


async def test_events_for_delivers_only_what_each_agent_is_entitled_to(store: HubStore) -> None:
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
    # Sanity: the scenario exercises every rule. Presence makes no event.
    assert expected["a"] == [2, 5]
    assert expected["b"] == [1, 2, 3, 4]
    assert expected["c"] == [1, 4, 5]
    # An agent that never said hello still gets broadcasts.
    assert expected["d"] == [1, 4, 5]

    for agent, seqs in expected.items():
        events = await store.events_for(agent, 0, 100)
        assert [e.seq for e in events] == seqs, agent
    b_events = await store.events_for("b", 0, 100)
    assert [e.WhichOneof("body") for e in b_events] == [
        "artifact_shared",
        "collaboration_updated",
        "feature_requested",
        "feature_requested",
    ]
    assert b_events[2].sender_id == "c"
    assert list(b_events[2].feature_requested.request.routed_to) == ["b"]

    # limit and after_seq page through the same sequence.
    assert [e.seq for e in await store.events_for("b", 0, 2)] == [1, 2]
    assert [e.seq for e in await store.events_for("b", 2, 2)] == [3, 4]
    assert [e.seq for e in await store.events_for("b", 4, 10)] == []
    assert [e.seq for e in await store.events_for("c", 2, 100)] == [4, 5]


async def test_events_after_pages_through_every_event_whoever_it_was_for(
    store: HubStore,
) -> None:
    """A Watch stream's log: broadcast and directed events alike, in seq order."""
    await commit_ok(
        store,
        [
            online("a"),
            online("b", pb.SPECIALIZATION_PROCESS_MANAGER, ["memory_management"]),
            share("a", "s1"),
            propose("a", "c1", "b"),  # directed: a and b only
            request_feature("a", "f1"),  # routed to b only
        ],
    )
    # Presence is not in the log: the share, the proposal and the request are seqs 1-3.
    assert [e.seq for e in await store.events_after(0, 100)] == [1, 2, 3]
    first = await store.events_after(0, 2)
    assert [e.seq for e in first] == [1, 2] and first.more
    last = await store.events_after(0, 100)
    assert [e.WhichOneof("body") for e in last] == [
        "artifact_shared",
        "collaboration_updated",
        "feature_requested",
    ]
    assert not last.more
    assert list(await store.events_after(3, 100)) == []
    # The byte budget ends a page early, but always carries one event.
    tight = await store.events_after(0, 100, max_bytes=1)
    assert [e.seq for e in tight] == [1] and tight.more


async def test_hub_raised_events_reach_both_partners(open_store: OpenStore) -> None:
    async with open_store(Policy(proposal_ttl=timedelta(seconds=-1))) as store:  # already due
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


async def test_an_older_stream_going_offline_leaves_a_newer_connect_online(
    store: HubStore,
) -> None:
    """A stream on one replica ends after its agent connected again on another: the later
    AgentOnline wins, so the agent stays online (and its partners keep no offline grace)."""
    [first] = await commit_ok(store, [online("a")])
    [second] = await commit_ok(store, [online("a")])
    assert first.agent is not None and second.agent is not None
    older, newer = first.presence_rev, second.presence_rev
    assert newer > older  # two changes of the row: two revisions (no clock compared)
    await commit_ok(store, [cmd.AgentOffline("a", rev=older)])
    listed = await store.list_agents(True, 10, "")
    assert [a.agent_id for a in listed.items] == ["a"], "still online: it connected again"
    await commit_ok(store, [cmd.AgentOffline("a", rev=newer)])
    assert not (await store.list_agents(True, 10, "")).items


# --- pagination ----------------------------------------------------------------------------------


async def test_every_list_pages_through_everything_once(store: HubStore) -> None:
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


async def test_collaborations_are_listed_newest_first(
    store_kind: str, open_store: OpenStore
) -> None:
    if store_kind == "postgres":
        # A PostgreSQL round trip usually outlasts a millisecond, so consecutive proposals
        # rarely share one, which hides the bug there; the faster stores meet it.
        pytest.skip("needs proposals committed within one millisecond")
    policy = Policy(
        max_open_per_agent=10_000, max_open_per_pair=10_000, max_incoming_proposals=10_000
    )
    async with open_store(policy) as store:
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


async def test_open_session_limits_count_what_is_open(open_store: OpenStore) -> None:
    """The per-pair and incoming limits count open sessions only: one that ends frees its
    slot, in the same commit as the next proposal too."""
    policy = Policy(max_open_per_agent=10, max_open_per_pair=2, max_incoming_proposals=3)
    async with open_store(policy) as store:
        await commit_ok(store, [online(a) for a in "abcd"])
        first, _ = await commit_ok(store, [propose("a", "p1", "b"), propose("b", "p2", "a")])
        [refused] = await store.commit([propose("a", "p3", "b")])
        assert (
            isinstance(refused, StatusError) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert "per pair" in refused.message
        # Declined (no longer open) and a new proposal, in one commit.
        decline = cmd.CollaborationStep("b", "d1", first.resource_id, Step.DECLINE)
        _, again = await commit_ok(store, [decline, propose("a", "p3", "b")])
        assert again.resource_id.startswith("collab_")
        # Unanswered proposals waiting for d: three, then refused.
        await commit_ok(store, [propose(x, f"to_d_{x}", "d") for x in "abc"])
        [full] = await store.commit([propose("a", "to_d_again", "d")])
        assert isinstance(full, StatusError) and full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "unanswered proposals" in full.message


# --- tokens --------------------------------------------------------------------------------------


async def test_token_lifecycle(store: HubStore) -> None:
    issued = await store.issue_token("AI_Node_1")
    assert issued.token.startswith("kh_") and issued.expires_at is None
    assert await store.authenticate(issued.token) == Principal("AI_Node_1", Role.AGENT)
    assert await store.authenticate(issued.token + "x") is None
    assert await store.authenticate("") is None

    second = await store.issue_token("AI_Node_1", ttl=timedelta(hours=1))
    other = await store.issue_token("AI_Node_2")
    assert await store.authenticate(second.token) == Principal("AI_Node_1", Role.AGENT)
    rows = await store.list_tokens()
    assert {r.token_id for r in rows} == {issued.token_id, second.token_id, other.token_id}
    assert all(r.token_hash not in (issued.token, second.token, other.token) for r in rows)

    # Revoking one token by id leaves the agent's other tokens alone.
    assert await store.revoke_tokens(issued.token_id) == 1
    assert await store.authenticate(issued.token) is None
    assert await store.authenticate(second.token) == Principal("AI_Node_1", Role.AGENT)
    # Revoking by agent revokes the rest of that agent's tokens only.
    assert await store.revoke_tokens("AI_Node_1") == 1
    assert await store.authenticate(second.token) is None
    assert await store.authenticate(other.token) == Principal("AI_Node_2", Role.AGENT)
    assert await store.revoke_tokens("AI_Node_1") == 0

    observer = await store.issue_token("watcher", role=Role.OBSERVER)
    assert await store.authenticate(observer.token) == Principal("watcher", Role.OBSERVER)
    assert {r.token_id: r.role for r in await store.list_tokens()}[observer.token_id] == "observer"

    expired = await store.issue_token("AI_Node_3", ttl=timedelta(seconds=-1))
    assert expired.expires_at is not None
    assert await store.authenticate(expired.token) is None


async def test_the_live_streams_token_recheck_keeps_only_unrevoked_unexpired_tokens(
    store: HubStore,
) -> None:
    """`valid_token_hashes`, which ends the streams of revoked and expired tokens: the hashes
    asked for that are still good, across more than one of the SQL store's statements (512
    hashes each), unknown hashes and repeats included."""
    good = [await store.issue_token(f"AI_Node_{i}") for i in range(600)]
    later = await store.issue_token("AI_Node_later", ttl=timedelta(hours=1))
    expired = await store.issue_token("AI_Node_expired", ttl=timedelta(seconds=-1))
    revoked = await store.issue_token("AI_Node_revoked")
    assert await store.revoke_tokens(revoked.token_id) == 1
    kept = {hash_token(t.token) for t in [*good, later]}
    asked = [
        *kept,
        hash_token(expired.token),
        hash_token(revoked.token),
        hash_token("kh_never_issued"),
        hash_token(good[0].token),  # a repeat
    ]
    assert await store.valid_token_hashes(asked) == kept
    assert await store.valid_token_hashes([hash_token(later.token)]) == {hash_token(later.token)}
    assert await store.valid_token_hashes([hash_token(expired.token)]) == set()
    assert await store.valid_token_hashes([]) == set()


async def test_tokens_page_by_id_without_secrets(store: HubStore) -> None:
    issued = [await store.issue_token(f"AI_Node_{i}") for i in range(5)]
    admin = await store.issue_token("ops", ttl=timedelta(hours=1), role=Role.ADMIN)
    await store.revoke_tokens(issued[0].token_id)
    items, pages = await all_pages(lambda limit, cursor: store.list_tokens_page(limit, cursor), 2)
    assert pages == 3
    ids = [t.token_id for t in items]
    assert ids == sorted(ids) and set(ids) == {t.token_id for t in [*issued, admin]}
    by_id = {t.token_id: t for t in items}
    assert by_id[admin.token_id].role == pb.ROLE_ADMIN
    assert by_id[admin.token_id].HasField("expire_time")
    assert by_id[issued[0].token_id].HasField("revoke_time")
    assert not by_id[issued[1].token_id].HasField("revoke_time")
    wire = b"".join(t.SerializeToString() for t in items)
    assert all(t.token.encode() not in wire for t in [*issued, admin])


# --- stats -----------------------------------------------------------------------------------------


async def test_stats_count_what_is_stored(store: HubStore) -> None:
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


# --- retention --------------------------------------------------------------------------------


async def test_pruning_events_keeps_the_newest_and_the_knowledge_base(store: HubStore) -> None:
    """Events go from the oldest, with their recipients (a direct event's reader no longer
    finds it); the newest is kept whatever is asked (it carries the head); artifacts stay."""
    assert await store.oldest_seq() == 1, "an empty log starts at 1"
    await commit_ok(store, [online("a"), online("b")])
    [proposal] = await commit_ok(store, [propose("a", "c1", "b")])  # direct: to a and b
    shares = await commit_ok(store, [share("a", f"m{i}", f"p{i}") for i in range(5)])
    head = await store.head_seq()
    assert head == shares[-1].seq

    # Without an age, the oldest `limit` at or below the bound; with one, only older events.
    assert await store.prunable_through(head, None, 3) == 3
    assert await store.prunable_through(2, None, 100) == 2
    assert await store.prunable_through(head, utcnow() - timedelta(hours=1), 100) == 0
    assert await store.prunable_through(head, utcnow() + timedelta(hours=1), 100) == head

    assert await store.prune_events(proposal.seq) == proposal.seq
    assert await store.oldest_seq() == proposal.seq + 1
    assert [e.seq for e in await store.events_for("b", 0, 100)] == [s.seq for s in shares]
    assert await artifact_count(store) == 5, "the knowledge base is never pruned"

    assert await store.prune_events(head + 10) == len(shares) - 1, "all but the newest"
    assert await store.oldest_seq() == head == await store.head_seq()
    [after] = await commit_ok(store, [share("a", "m-after", "p-after")])
    assert after.seq == head + 1, "the log goes on after its head"


async def test_pruning_the_ledger_makes_an_old_message_id_new(store: HubStore) -> None:
    [first] = await commit_ok(store, [share("a", "m1")])
    [again] = await commit_ok(store, [share("a", "m1")])
    assert again.duplicate and again.seq == first.seq
    assert await store.prune_ledger(utcnow() - timedelta(hours=1), 100) == 0, "not old yet"
    assert await store.prune_ledger(utcnow() + timedelta(seconds=1), 100) == 1
    [new] = await commit_ok(store, [share("a", "m1")])
    assert not new.duplicate and new.seq > first.seq, "forgotten: a new message"


async def test_pruning_the_ledger_goes_a_batch_at_a_time(store: HubStore) -> None:
    for batch in range(3):  # three commits: three times
        await commit_ok(store, [share("a", f"m{batch}-{i}", f"p{batch}-{i}") for i in range(4)])
    later = utcnow() + timedelta(seconds=1)
    first = await store.prune_ledger(later, 5)
    # The rows of one commit share a time: a batch ends with the commit its last row is in.
    assert first in (5, 8)
    assert first + await store.prune_ledger(later, 100) == 12
    assert await store.prune_ledger(later, 100) == 0


# --- the validation queue -------------------------------------------------------------------


def claim(validator: str, lease_ttl: float = 60.0, max_attempts: int = 3) -> cmd.ClaimValidation:
    return cmd.ClaimValidation(validator, lease_ttl, max_attempts)


def leased(outcome: Outcome) -> pb.ValidationLease:
    assert outcome.lease, "no lease was given"
    return pb.ValidationLease.FromString(outcome.lease)


PASSED = pb.ValidationVerdict(state=pb.VALIDATION_STATE_PASSED, build_ok=True, tests_run=1)


async def test_components_are_leased_oldest_first_each_to_one_validator(store: HubStore) -> None:
    shared = await commit_ok(
        store, [online("a"), share("a", "m1"), share_os("a", "m2"), share_os("a", "m3")]
    )
    first_component, second_component = shared[2].resource_id, shared[3].resource_id
    one, two, none = await commit_ok(store, [claim("v1"), claim("v2"), claim("v1")])
    # The pattern is not queued; the components go in the order they were shared, once each.
    assert [leased(one).artifact.artifact_id, leased(two).artifact.artifact_id] == [
        first_component,
        second_component,
    ]
    assert leased(one).attempt == 1 and leased(one).lease_id != leased(two).lease_id
    assert leased(one).artifact.validation_state == pb.VALIDATION_STATE_PENDING
    assert not none.lease
    # Nothing claimable: the claim says when the first lease runs out.
    assert none.retry_at is not None
    assert abs(none.retry_at.timestamp() - leased(one).expire_time.ToSeconds()) < 1


async def test_a_verdict_is_stored_with_the_artifact_and_announced(store: HubStore) -> None:
    shared = await commit_ok(store, [online("a"), share_os("a", "m1"), share("a", "m2")])
    artifact_id = shared[1].resource_id
    (claimed,) = await commit_ok(store, [claim("v1")])
    lease = leased(claimed)
    (verdict,) = await commit_ok(store, [cmd.SubmitVerdict("v1", lease.lease_id, PASSED)])
    (event,) = verdict.events
    assert event.recipients is None  # to those subscribed to the artifact
    # Tagged as the artifact's share (an OS component, filed under artifacts), sent by v1.
    assert (event.tags.kind, event.tags.artifact_kind, event.tags.contributor) == (
        pb.EVENT_KIND_ARTIFACTS,
        pb.ARTIFACT_KIND_OS_COMPONENT,
        "v1",
    )
    validated = event.event.artifact_validated
    assert validated.artifact_id == artifact_id and validated.contributor_id == "a"
    assert validated.verdict.validator_id == "v1" and validated.verdict.validate_time.seconds
    stored = await store.get_artifact(artifact_id)
    assert stored is not None
    assert stored.validation_state == pb.VALIDATION_STATE_PASSED
    assert stored.verdict.state == pb.VALIDATION_STATE_PASSED and stored.verdict.build_ok
    assert (await store.events_for("a", verdict.seq - 1, 10))[0].HasField("artifact_validated")
    # The filter, and the counts.
    page = await store.list_artifacts(0, 0, "", 10, "", None, pb.VALIDATION_STATE_PASSED)
    assert [a.artifact_id for a in page.items] == [artifact_id]
    assert not (
        await store.list_artifacts(0, 0, "", 10, "", None, pb.VALIDATION_STATE_FAILED)
    ).items
    stats = await store.stats()
    assert dict(stats.artifacts_by_validation_state) == {"VALIDATION_STATE_PASSED": 1}
    # A resend of the same lease's verdict is answered as the first; nothing new is stored.
    (again,) = await commit_ok(store, [cmd.SubmitVerdict("v1", lease.lease_id, PASSED)])
    assert (again.seq, again.duplicate, again.events) == (verdict.seq, True, [])
    (nothing,) = await commit_ok(store, [claim("v2")])
    assert not nothing.lease and nothing.retry_at is None


async def test_a_shares_verdict_reaches_its_contributor_whatever_it_subscribed_to(
    store: HubStore,
) -> None:
    """To the contributor always; to others by their subscription (issue 15)."""
    await commit_ok(store, [online("a"), share_os("a", "m1")])
    (claimed,) = await commit_ok(store, [claim("v1")])
    (verdict,) = await commit_ok(store, [cmd.SubmitVerdict("v1", leased(claimed).lease_id, PASSED)])
    (event,) = verdict.events
    assert event.recipients is None and event.tags.also_to == frozenset({"a"})
    nothing = subscription(contributors=["nobody"])  # matches no artifact at all
    after = verdict.seq - 1
    assert [e.seq for e in await store.events_for("a", after, 10, subscription=nothing)] == [
        verdict.seq
    ]
    assert [e.seq for e in await store.events_for("b", after, 10, subscription=nothing)] == []
    assert [e.seq for e in await store.events_for("b", after, 10)] == [verdict.seq]


async def test_a_delivery_s_verdict_goes_to_its_requester_and_deliverer_only(
    store: HubStore,
) -> None:
    """A feature delivery is private (its event went to the requester only): so is its
    verdict, to the two agents of the exchange, whatever anyone subscribed to."""
    await commit_ok(
        store, [online("a"), online("b", pb.SPECIALIZATION_PROCESS_MANAGER, ["memory_management"])]
    )
    [request] = await commit_ok(store, [request_feature("a", "f1")])
    delivery = pb.DeliverFeature(request_id=request.resource_id, component=os_component())
    await commit_ok(store, [cmd.DeliverFeature("b", "d1", delivery)])
    (claimed,) = await commit_ok(store, [claim("v1")])
    (verdict,) = await commit_ok(store, [cmd.SubmitVerdict("v1", leased(claimed).lease_id, PASSED)])
    (event,) = verdict.events
    assert event.recipients == frozenset({"a", "b"})
    for agent, entitled in (("a", True), ("b", True), ("c", False)):
        seqs = [e.seq for e in await store.events_for(agent, verdict.seq - 1, 10)]
        assert seqs == ([verdict.seq] if entitled else []), agent


async def test_an_expired_lease_goes_to_the_next_validator_and_its_verdict_is_refused(
    store: HubStore,
) -> None:
    await commit_ok(store, [online("a"), share_os("a", "m1")])
    # A TTL of 0: the lease is over as soon as it is given, without waiting for a clock.
    (first,) = await commit_ok(store, [claim("v1", lease_ttl=0)])
    late = await store.commit([cmd.SubmitVerdict("v1", leased(first).lease_id, PASSED)])
    assert isinstance(late[0], StatusError)
    assert late[0].code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in late[0].message
    (second,) = await commit_ok(store, [claim("v2")])
    assert leased(second).attempt == 2
    assert leased(second).artifact.artifact_id == leased(first).artifact.artifact_id
    older = await store.commit([cmd.SubmitVerdict("v1", leased(first).lease_id, PASSED)])
    assert isinstance(older[0], StatusError) and "leased again" in older[0].message
    stolen = await store.commit([cmd.SubmitVerdict("v3", leased(second).lease_id, PASSED)])
    assert isinstance(stolen[0], StatusError)
    assert stolen[0].code == grpc.StatusCode.PERMISSION_DENIED
    unknown = await store.commit([cmd.SubmitVerdict("v2", "art_nope:1:00", PASSED)])
    assert isinstance(unknown[0], StatusError) and unknown[0].code == grpc.StatusCode.NOT_FOUND
    await commit_ok(store, [cmd.SubmitVerdict("v2", leased(second).lease_id, PASSED)])


async def test_a_component_whose_every_lease_expired_gets_the_hubs_error_verdict(
    store: HubStore,
) -> None:
    shared = await commit_ok(store, [online("a"), share_os("a", "m1"), share_os("a", "m2")])
    doomed, other = shared[1].resource_id, shared[2].resource_id
    (claimed,) = await commit_ok(store, [claim("v1", lease_ttl=0, max_attempts=1)])
    assert leased(claimed).artifact.artifact_id == doomed
    # A lease that expired puts its component behind those never tried.
    (second,) = await commit_ok(store, [claim("v2", max_attempts=1)])
    assert leased(second).artifact.artifact_id == other
    (third,) = await commit_ok(store, [claim("v2", max_attempts=1)])
    # The hub judged the first itself: its one lease expired.
    assert not third.lease
    (event,) = third.events
    assert event.event.artifact_validated.artifact_id == doomed
    assert event.event.sender_id == ""
    stored = await store.get_artifact(doomed)
    assert stored is not None and stored.validation_state == pb.VALIDATION_STATE_ERROR
    assert "1 lease(s) expired" in stored.verdict.diagnostics


async def test_pending_validations_survive_a_reopen(store_kind: str, open_store: OpenStore) -> None:
    if store_kind == "memory":
        pytest.skip("the memory store keeps nothing by design")
    async with open_store() as store:
        shared = await commit_ok(store, [online("a"), share_os("a", "m1"), share_os("a", "m2")])
        (claimed,) = await commit_ok(store, [claim("v1")])
    async with open_store() as store:
        (again,) = await commit_ok(store, [claim("v2")])
        assert leased(again).artifact.artifact_id == shared[2].resource_id
        await commit_ok(store, [cmd.SubmitVerdict("v1", leased(claimed).lease_id, PASSED)])


async def test_one_validator_holds_a_bounded_number_of_leases(store: HubStore) -> None:
    await commit_ok(store, [online("a"), share_os("a", "m1"), share_os("a", "m2")])
    await commit_ok(store, [share_os("a", "m3")])
    limited = cmd.ClaimValidation("v1", 60.0, 3, max_leases=2)
    await commit_ok(store, [limited, limited])
    (refused,) = await store.commit([limited])
    assert isinstance(refused, StatusError)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 leases" in refused.message
    (other,) = await commit_ok(store, [claim("v2")])  # another validator is not held back
    assert other.lease


# --- subscriptions: the store filters the replay ----------------------------------------------


def share_as(agent: str, message_id: str, spec: int) -> cmd.ShareArtifact:
    content = pattern(message_id)
    content.specialization = spec  # type: ignore[assignment]
    return cmd.ShareArtifact(
        agent, message_id, pb.Artifact(kind=pb.ARTIFACT_KIND_PATTERN, pattern=content)
    )


def subscription(**fields: Any) -> Filter:
    return Filter.of(pb.Subscription(**fields))


ART, FEAT, COLLAB, PRESENCE = (
    pb.EVENT_KIND_ARTIFACTS,
    pb.EVENT_KIND_FEATURE_REQUESTS,
    pb.EVENT_KIND_COLLABORATIONS,
    pb.EVENT_KIND_PRESENCE,
)
NET, SEC, FS, AUDIO = (
    pb.SPECIALIZATION_NETWORKING,
    pb.SPECIALIZATION_SECURITY,
    pb.SPECIALIZATION_FILE_SYSTEM,
    pb.SPECIALIZATION_AUDIO,
)
# reader, subscription fields, the seqs it is entitled to (`commit_filtered_scenario`)
FILTERED: list[tuple[str, dict[str, Any], list[int]]] = [
    ("c", {}, [1, 2, 4, 5, 6]),
    ("c", {"event_kinds": [ART]}, [1, 2, 5, 6]),
    ("c", {"event_kinds": [FEAT]}, [4, 5, 6]),
    ("c", {"event_kinds": [PRESENCE]}, [5, 6]),  # only what is addressed to it
    ("c", {"event_kinds": [COLLAB, PRESENCE]}, [5, 6]),
    ("c", {"specializations": [SEC]}, [2, 5, 6]),  # the contributor's specialization
    ("c", {"specializations": [AUDIO]}, [2, 5, 6]),  # the content's
    ("c", {"specializations": [NET]}, [1, 4, 5, 6]),  # content, contributor, requester
    ("c", {"specializations": [AUDIO, NET]}, [1, 2, 4, 5, 6]),
    ("c", {"contributors": ["a"]}, [1, 4, 5, 6]),
    ("c", {"contributors": ["a"], "event_kinds": [ART]}, [1, 5, 6]),
    ("c", {"contributors": ["b"], "specializations": [NET]}, [5, 6]),  # AND across fields
    ("c", {"artifact_kinds": [pb.ARTIFACT_KIND_CODE_COMPONENT]}, [4, 5, 6]),  # artifacts only
    ("c", {"artifact_kinds": [pb.ARTIFACT_KIND_PATTERN], "event_kinds": [ART]}, [1, 2, 5, 6]),
    ("b", {"specializations": [FS]}, [3]),
    ("b", {"event_kinds": [ART], "artifact_kinds": [pb.ARTIFACT_KIND_OS_COMPONENT]}, [3]),
    ("d", {"contributors": ["c"]}, [3]),  # an agent that never said hello
]


async def commit_filtered_scenario(store: HubStore) -> None:
    """The six events FILTERED's cases are entitled to, or not."""
    await commit_ok(
        store,
        [
            online("a", NET),
            online("b", SEC),
            online("c", FS, ["memory_management"]),
            share_as("a", "s1", NET),  # 1: pattern, networking, by a (networking)
            share_as("b", "s2", AUDIO),  # 2: pattern, audio, by b (security)
            share_os("c", "s3"),  # 3: OS component, networking, by c (file_system)
            request_feature("a", "f1", "not_known"),  # 4: broadcast, by a (networking)
            request_feature("b", "f2"),  # 5: routed to c only
            propose("a", "c1", "c"),  # 6: to a and c
        ],
    )


@pytest.mark.parametrize("case", range(len(FILTERED)))
async def test_events_for_applies_the_subscription(store: HubStore, case: int) -> None:
    await commit_filtered_scenario(store)
    reader, fields, seqs = FILTERED[case]
    events = await store.events_for(reader, 0, 100, subscription=subscription(**fields))
    assert [e.seq for e in events] == seqs
    # Pages of a filtered read go on where the last ended.
    first = await store.events_for(reader, 0, 1, subscription=subscription(**fields))
    assert [e.seq for e in first] == seqs[:1] and first.more == (len(seqs) > 1)
    rest = await store.events_for(reader, seqs[0], 100, subscription=subscription(**fields))
    assert [e.seq for e in rest] == seqs[1:]


@pytest.mark.parametrize("case", range(len(FILTERED)))
async def test_a_filtered_read_looks_no_further_than_its_scan_bound(
    store: HubStore, case: int
) -> None:
    """Reads of 2 seqs at a time: each stops at its bound and says so (`through`), and
    reading on from where it looked yields every entitled event once, in order; the read
    that reaches the log's end says there is no more."""
    await commit_filtered_scenario(store)
    reader, fields, seqs = FILTERED[case]
    got: list[int] = []
    after, reads = 0, []
    while True:
        page = await store.events_for(reader, after, 100, None, subscription(**fields), 2)
        assert all(after < e.seq <= after + 2 for e in page)
        got += [e.seq for e in page]
        reads.append((after, page.more, page.through))
        if not page.more:
            break
        assert page.through == after + 2  # the page is not full: the bound cut it
        after = page.through
    assert got == seqs
    assert reads == [(0, True, 2), (2, True, 4), (4, False, 0)]
    # A page that fills within the bound is an ordinary page: more, but no `through`.
    full = await store.events_for(reader, 0, 1, None, subscription(**fields), 100)
    assert [e.seq for e in full] == seqs[:1]
    assert (full.more, full.through) == (len(seqs) > 1, 0)


async def test_a_share_is_tagged_with_its_senders_specialization_at_its_commit(
    store: HubStore,
) -> None:
    """A hello that changes the sender's specialization retags its later shares, in the same
    commit and in the next ones (a writer that keeps specializations between commits must
    forget the one a hello changes)."""
    unspecified = pb.SPECIALIZATION_UNSPECIFIED  # the content adds no specialization
    await commit_ok(store, [online("a", NET), share_as("a", "s1", unspecified)])
    await commit_ok(store, [share_as("a", "s2", unspecified)])
    await commit_ok(store, [online("a", SEC), share_as("a", "s3", unspecified)])
    await commit_ok(store, [share_as("a", "s4", unspecified)])
    await commit_ok(store, [online("a", FS)])
    await commit_ok(store, [share_as("a", "s5", unspecified), share_as("a", "s6", unspecified)])
    for spec, seqs in ((NET, [1, 2]), (SEC, [3, 4]), (FS, [5, 6])):
        events = await store.events_for(
            "c", 0, 100, subscription=subscription(specializations=[spec])
        )
        assert [e.seq for e in events] == seqs, spec


async def test_presence_changes_of_many_agents_in_one_commit(open_store: OpenStore) -> None:
    """A batch of presence changes (as a connect storm commits them, more agents than one
    read of them takes): each sees its own agent as the commands before it left it, and
    the partner of an open session going offline gives it the offline grace."""
    policy = Policy(proposal_ttl=timedelta(seconds=600), partner_offline_grace=timedelta(seconds=5))
    async with open_store(policy) as store:
        await commit_ok(store, [online("a"), online("b")])
        [proposed] = await commit_ok(store, [propose("a", "p1", "b")])
        many = [f"n{i:04d}" for i in range(1100)]
        await commit_ok(
            store,
            [
                *(online(agent) for agent in many),
                cmd.AgentOffline("b"),
                cmd.AgentOffline("never_seen"),
                online("fresh", SEC),
                online("fresh", FS),  # the batch's own row, not "no such agent"
                *(cmd.AgentOffline(agent) for agent in many[::2]),
            ],
        )
        listed = await store.list_agents(True, 2000, "")
        assert {a.agent_id for a in listed.items} == {"a", "fresh", *many[1::2]}
        [fresh] = [a for a in listed.items if a.agent_id == "fresh"]
        assert fresh.specialization == FS
        [row] = (await store.list_collaborations("", 0, 10, "")).items
        assert row.session_id == proposed.resource_id
        grace = row.expire_time.ToDatetime() - row.create_time.ToDatetime()
        assert grace < timedelta(seconds=600), "b went offline: the grace, not the TTL"


async def test_a_partner_back_in_the_same_commit_gets_the_full_deadline(
    open_store: OpenStore,
) -> None:
    """A proposal to an offline agent and that agent's hello in one group commit: the hello
    sees the proposal its batch-mate made, so the deadline is the full proposal TTL, not the
    offline grace, exactly as if they had come in two commits."""
    policy = Policy(proposal_ttl=timedelta(seconds=600), partner_offline_grace=timedelta(seconds=5))
    async with open_store(policy) as store:
        await commit_ok(store, [online("a"), online("b")])
        await commit_ok(store, [cmd.AgentOffline("b")])
        # (c's hello first: whatever a first presence change reads has been read.)
        [_, proposed, _] = await commit_ok(
            store, [online("c"), propose("a", "p1", "b"), online("b")]
        )
        [row] = (await store.list_collaborations("", 0, 10, "")).items
        assert row.session_id == proposed.resource_id
        assert row.expire_time.ToDatetime() - row.create_time.ToDatetime() == timedelta(seconds=600)

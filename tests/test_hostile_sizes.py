"""Issue 11, parts 1 and 2: unknown protobuf fields, and responses that must always fit.

Unknown fields are bytes the contract does not define: the hub must neither store nor route
them, and must not send on those already in a database written by older code. Every
response it builds (live events, replay, training syncs, query pages) must fit the
configured maximum message size; a stored event that cannot is replaced by a marker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
import sqlalchemy
from google.protobuf.message import Message

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.collaboration import Policy
from hub_service.config import HubConfig
from hub_service.server import HubServer

from .conftest import (
    WAIT,
    HubHarness,
    code_component,
    hello,
    make_config,
    os_component,
    pattern,
    varint,
)

MIB = 1024 * 1024
FOUR_BYTE = "\U0001f600"  # one character, four bytes of UTF-8
MAX_TEXT = FOUR_BYTE * 4096  # Limits.max_text_length characters: 16 KiB


def nested(number: int, payload: bytes) -> bytes:
    """Field `number` holding `payload`, length-delimited (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def unknown(size: int, number: int = 99) -> bytes:
    """One length-delimited field the contract does not define, `size` bytes long."""
    return nested(number, b"u" * size)


def with_unknown(message: Message, size: int) -> Message:
    """`message` carrying an unknown field of `size` bytes (protobuf keeps it on parse)."""
    poisoned = type(message)()
    poisoned.MergeFromString(message.SerializeToString() + unknown(size))
    return poisoned


def poisoned_share(pattern_id: str, size: int) -> pb.ConnectRequest:
    """A share_pattern with unknown fields at every level: the Pattern (nearly all of
    `size`), the SharePattern, the ConnectRequest, and inside one attribute's map entry."""
    entry = nested(1, b"k") + nested(2, b"v") + unknown(16, number=7)
    inner = pattern(pattern_id).SerializeToString() + nested(8, entry) + unknown(size)
    share = nested(1, inner) + unknown(32, number=50)
    raw = pb.ConnectRequest(message_id=f"m_{pattern_id}").SerializeToString()
    return pb.ConnectRequest.FromString(raw + nested(11, share) + unknown(32, number=77))


async def stored_body_sizes(database_url: str, table: str) -> list[int]:
    def read() -> list[int]:
        engine = sqlalchemy.create_engine(database_url)
        try:
            with engine.connect() as conn:
                return [
                    len(b) for (b,) in conn.execute(sqlalchemy.text(f"SELECT body FROM {table}"))
                ]
        finally:
            engine.dispose()

    return await asyncio.to_thread(read)


async def all_pages(fetch: Callable[[str], Awaitable[Any]], items: str) -> tuple[list[Any], int]:
    """Every item of a paginated query, and how many pages it took."""
    got: list[Any] = []
    token, pages = "", 0
    while True:
        page = await fetch(token)
        pages += 1
        assert page.ByteSize() <= HubConfig.max_message_bytes
        got += getattr(page, items)
        if not page.next_page_token:
            return got, pages
        assert getattr(page, items), "a page with a next token must not be empty"
        token = page.next_page_token


# --- part 1: unknown fields at the boundary ---------------------------------------------------


async def test_unknown_fields_in_a_share_are_neither_stored_nor_broadcast(
    harness: HubHarness, hub_config: HubConfig
) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    request = poisoned_share("p1", MIB)
    assert request.ByteSize() > MIB  # the client really sends the unknown bytes
    await alice.call.write(request)
    mid = request.message_id
    receipt = await alice.receipt(mid)
    event = await bob.event("artifact_shared")
    assert event.seq == receipt.seq
    assert event.ByteSize() < 1024, "the broadcast carried the unknown bytes"
    stored = await harness.query(
        "GetArtifact", pb.GetArtifactRequest(artifact_id=receipt.resource_id)
    )
    assert stored.artifact.ByteSize() < 1024
    assert stored.artifact.pattern.pattern_id == "p1"
    assert max(await stored_body_sizes(hub_config.database_url, "artifact")) < 1024
    assert max(await stored_body_sizes(hub_config.database_url, "event")) < 1024


async def test_unknown_fields_in_every_nested_message_are_discarded(
    harness: HubHarness, hub_config: HubConfig
) -> None:
    """Requirements, OS components (share, delivery, batched) and Hello: nothing unknown
    reaches a table."""
    alice = await harness.connect("alice", with_unknown(hello("alice"), 4096))  # type: ignore[arg-type]
    bob = await harness.connect("bob")
    request = pb.ConnectRequest(
        message_id="f1",
        request_feature=pb.RequestFeature(
            feature="network_stack",
            requirements=with_unknown(  # type: ignore[arg-type]
                pb.FeatureRequirements(
                    performance=pb.PERFORMANCE_LEVEL_HIGH, priority=pb.PRIORITY_LOW
                ),
                MIB,
            ),
            description="a stack",
        ),
    )
    request_id = (
        await bob.receipt(await bob.send("f1", request_feature=request.request_feature))
    ).resource_id
    deliver = pb.ConnectRequest(
        message_id="d1",
        deliver_feature=pb.DeliverFeature(
            request_id=request_id,
            component=with_unknown(os_component(), MIB),  # type: ignore[arg-type]
        ),
    )
    share = pb.ConnectRequest(
        message_id="s1",
        share_code_component=pb.ShareCodeComponent(
            code_component=with_unknown(code_component(), MIB)  # type: ignore[arg-type]
        ),
    )
    batch = pb.ConnectRequest(message_id="b1", batch=pb.RequestBatch(requests=[deliver, share]))
    await alice.call.write(batch)
    await alice.receipt("d1")
    await alice.receipt("s1")
    delivered = await bob.event("feature_delivered")
    assert delivered.ByteSize() < 4096
    for table in ("artifact", "event", "feature_request"):
        assert max(await stored_body_sizes(hub_config.database_url, table)) < 4096, table
    agents = await harness.query("ListAgents", pb.ListAgentsRequest())
    assert agents.ByteSize() < 4096


async def test_later_connects_work_after_shares_with_huge_unknown_fields(
    harness: HubHarness,
) -> None:
    """Two ~2.1 MiB shares used to make every later Connect fail RESOURCE_EXHAUSTED (the
    training sync carries the newest artifacts)."""
    alice = await harness.connect("alice")
    for i in range(2):
        request = poisoned_share(f"big{i}", 2 * MIB + 100 * 1024)
        await alice.call.write(request)
        await alice.receipt(request.message_id)
    late = await harness.connect("late")
    sync = await asyncio.wait_for(_first_sync(late), WAIT)
    assert [a.pattern.pattern_id for a in sync.knowledge_base.recent_artifacts] == ["big1", "big0"]
    replayed = await late.event("artifact_shared", pattern__pattern_id="big1")
    assert replayed.ByteSize() < 1024


async def _first_sync(trainer: Any) -> pb.TrainingSync:
    while not trainer.syncs:
        await trainer._read_one()
    sync: pb.TrainingSync = trainer.syncs[0]
    return sync


# --- part 1: a database already poisoned by older code ----------------------------------------


def _append_unknown_to_content(body: bytes, size: int, kind: type[Message], path: str) -> bytes:
    """`body` (a serialized `kind`) with an unknown field inside the nested message at `path`."""
    message = kind.FromString(body)
    target = message
    for part in path.split("."):
        target = getattr(target, part)
    raw = target.SerializeToString() + unknown(size)
    target.Clear()
    target.MergeFromString(raw)
    return message.SerializeToString()


def _poison_database(database_url: str, size: int, huge: pb.Artifact) -> int:
    """What older hubs let in: unknown fields of `size` bytes inside every stored artifact,
    share event and feature request; plus an event and artifact whose known fields alone
    exceed the message limit. Returns the seq of that oversized event."""
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.begin() as conn:
            for artifact_id, body in conn.execute(
                sqlalchemy.text("SELECT artifact_id, body FROM artifact")
            ).all():
                conn.execute(
                    sqlalchemy.text("UPDATE artifact SET body = :b WHERE artifact_id = :i"),
                    {
                        "b": _append_unknown_to_content(body, size, pb.Artifact, "pattern"),
                        "i": artifact_id,
                    },
                )
            for seq, body in conn.execute(sqlalchemy.text("SELECT seq, body FROM event")).all():
                event = pb.HubEvent.FromString(body)
                kind = event.WhichOneof("body")
                path = {
                    "artifact_shared": "artifact_shared.pattern",
                    "feature_requested": "feature_requested.request.requirements",
                }.get(kind or "")
                if path is not None:
                    conn.execute(
                        sqlalchemy.text("UPDATE event SET body = :b WHERE seq = :s"),
                        {"b": _append_unknown_to_content(body, size, pb.HubEvent, path), "s": seq},
                    )
            for request_id, body in conn.execute(
                sqlalchemy.text("SELECT request_id, body FROM feature_request")
            ).all():
                conn.execute(
                    sqlalchemy.text("UPDATE feature_request SET body = :b WHERE request_id = :i"),
                    {
                        "b": _append_unknown_to_content(
                            body, size, pb.FeatureRequestInfo, "requirements"
                        ),
                        "i": request_id,
                    },
                )
            seq = int(conn.execute(sqlalchemy.text("SELECT max(seq) FROM event")).scalar_one()) + 1
            huge.artifact_id = "art_huge"
            huge.contributor_id = "ghost"
            conn.execute(
                sqlalchemy.text(
                    "INSERT INTO artifact (artifact_id, seq, kind, contributor_id, specialization,"
                    " name, created_at, body) VALUES ('art_huge', :s, :k, 'ghost', 5, 'huge',"
                    " CURRENT_TIMESTAMP, :b)"
                ),
                {"s": seq, "k": huge.kind, "b": huge.SerializeToString()},
            )
            event = pb.HubEvent(seq=seq, sender_id="ghost", artifact_shared=huge)
            # Tagged as an artifact, as migration 0004 tags what older hubs logged.
            conn.execute(
                sqlalchemy.text(
                    "INSERT INTO event (seq, sender_id, broadcast, created_at, body, kind)"
                    " VALUES (:s, 'ghost', true, CURRENT_TIMESTAMP, :b, :kind)"
                ),
                {"s": seq, "b": event.SerializeToString(), "kind": pb.EVENT_KIND_ARTIFACTS},
            )
        return seq
    finally:
        engine.dispose()


async def test_a_database_poisoned_by_older_code_serves_everything(database_url: str) -> None:
    """Rows carrying megabytes of unknown fields, and one event too big for any response,
    break neither Connect, replay, the training sync, GetArtifact nor the query pages."""
    config = make_config(database_url)
    first = HubServer(config)
    await first.start()
    harness = HubHarness(first)
    try:
        alice = await harness.connect("alice")
        await harness.connect("bob")
        for i in range(3):
            mid = await alice.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        await alice.receipt(mid)
        mid = await alice.send(
            request_feature=pb.RequestFeature(
                feature="network_stack",
                requirements=pb.FeatureRequirements(
                    performance=pb.PERFORMANCE_LEVEL_LOW, priority=pb.PRIORITY_LOW
                ),
            )
        )
        await alice.receipt(mid)
        await alice.close()
    finally:
        await harness.close()
        await first.stop()
    huge = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=code_component("huge", code="x" * (config.max_message_bytes + MIB)),
    )
    huge_seq = await asyncio.to_thread(_poison_database, database_url, 2 * MIB, huge)

    second = HubServer(config)
    await second.start()
    harness = HubHarness(second)
    try:
        bob = await harness.connect("bob", hello("bob"))
        sync = await asyncio.wait_for(_first_sync(bob), WAIT)
        recent = sync.knowledge_base.recent_artifacts
        assert [a.pattern.pattern_id for a in recent] == ["p2", "p1", "p0"]  # huge left out
        assert sync.ByteSize() < 64 * 1024
        await bob.until_seq(huge_seq)
        seqs = [e.seq for e in bob.events]
        assert seqs == sorted(set(seqs)), "replay must be in seq order, each once"
        marker = bob.events[-1]
        assert marker.seq == huge_seq and marker.sender_id == "ghost"
        assert marker.WhichOneof("body") == "omitted"
        assert marker.omitted.body == "artifact_shared"
        assert marker.omitted.event_bytes > config.max_message_bytes
        assert all(e.ByteSize() < 1024 for e in bob.events), "unknown bytes were replayed"
        # The stream is still usable: a live share arrives after the oversized event.
        carol = await harness.connect("carol")
        mid = await carol.send(share_pattern=pb.SharePattern(pattern=pattern("after")))
        receipt = await carol.receipt(mid)
        live = await bob.event("artifact_shared", pattern__pattern_id="after")
        assert live.seq == receipt.seq > huge_seq
        # Queries: poisoned rows are served without their unknown bytes.
        artifacts = await harness.query(
            "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_PATTERN)
        )
        assert len(artifacts.artifacts) == 4
        assert all(a.ByteSize() < 1024 for a in artifacts.artifacts)
        for artifact in artifacts.artifacts:
            got = await harness.query(
                "GetArtifact", pb.GetArtifactRequest(artifact_id=artifact.artifact_id)
            )
            assert got.artifact.ByteSize() < 1024
        # Unfiltered, the pages go through the oversized artifact: it is listed as a stub
        # (ids, kind, contributor, time; no content), and paging goes on past it.
        listed: list[pb.Artifact] = []
        token = ""
        for _ in range(20):
            page = await harness.query(
                "ListArtifacts", pb.ListArtifactsRequest(page_size=2, page_token=token)
            )
            assert page.ByteSize() < 8192
            listed.extend(page.artifacts)
            if not (token := page.next_page_token):
                break
        assert not token, "paging never ended"
        (stub,) = [a for a in listed if a.artifact_id == "art_huge"]
        assert stub.contributor_id == "ghost" and stub.kind == huge.kind
        assert stub.WhichOneof("content") is None
        assert len({a.artifact_id for a in listed}) == len(listed) == len(artifacts.artifacts) + 1
        requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
        assert len(requests.feature_requests) == 1 and requests.ByteSize() < 1024
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await harness.query("GetArtifact", pb.GetArtifactRequest(artifact_id="art_huge"))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "art_huge" in (refused.value.details() or "")
        assert "bytes" in (refused.value.details() or "")
        await bob.close()
    finally:
        await harness.close()
        await second.stop()


# --- part 2: query pages bounded by bytes ------------------------------------------------------


async def send_all(trainer: Any, requests: list[pb.ConnectRequest]) -> list[pb.Receipt]:
    """Send in batches of 32 and wait for every receipt."""
    for start in range(0, len(requests), 32):
        chunk = requests[start : start + 32]
        await trainer.call.write(
            pb.ConnectRequest(
                message_id=f"batch_{start}_{chunk[0].message_id}",
                batch=pb.RequestBatch(requests=chunk),
            )
        )
    return [await trainer.receipt(r.message_id) for r in requests]


async def test_feature_requests_with_maximal_descriptions_page_by_bytes(
    harness: HubHarness,
) -> None:
    alice = await harness.connect("alice")
    requests = [
        pb.ConnectRequest(
            message_id=f"f{i}",
            request_feature=pb.RequestFeature(
                feature="network_stack",
                requirements=pb.FeatureRequirements(
                    performance=pb.PERFORMANCE_LEVEL_LOW, priority=pb.PRIORITY_LOW
                ),
                description=MAX_TEXT,
            ),
        )
        for i in range(300)
    ]
    receipts = await send_all(alice, requests)

    async def fetch(token: str) -> Any:
        return await harness.query(
            "ListFeatureRequests", pb.ListFeatureRequestsRequest(page_size=500, page_token=token)
        )

    got, pages = await all_pages(fetch, "feature_requests")
    assert [r.request_id for r in got] == [r.resource_id for r in reversed(receipts)]
    assert pages >= 2


@pytest.fixture
def hub_config(request: pytest.FixtureRequest, database_url: str) -> HubConfig:
    """The default hub, or one with the overrides an indirect parameter names."""
    return make_config(database_url, **getattr(request, "param", {}))


# 15 open proposals between one pair at a time: above the default per-pair limit.
@pytest.mark.parametrize("hub_config", [{"policy": Policy(max_open_per_pair=16)}], indirect=True)
async def test_collaborations_with_long_texts_page_by_bytes(harness: HubHarness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    sessions: list[str] = []
    for round_ in range(10):  # 16 open proposals at most: propose 15, decline them, again
        proposals = [
            pb.ConnectRequest(
                message_id=f"p{round_}_{i}",
                propose_collaboration=pb.ProposeCollaboration(
                    target_agent_id="bob",
                    type=pb.COLLABORATION_TYPE_CODE_REVIEW,
                    description=MAX_TEXT,
                ),
            )
            for i in range(15)
        ]
        ids = [r.resource_id for r in await send_all(alice, proposals)]
        declines = [
            pb.ConnectRequest(
                message_id=f"d_{session}",
                decline_collaboration=pb.DeclineCollaboration(session_id=session, reason=MAX_TEXT),
            )
            for session in ids
        ]
        await send_all(bob, declines)
        sessions += ids

    async def fetch(token: str) -> Any:
        return await harness.query(
            "ListCollaborations", pb.ListCollaborationsRequest(page_size=500, page_token=token)
        )

    got, pages = await all_pages(fetch, "collaborations")
    assert sorted(c.session_id for c in got) == sorted(sessions)
    assert len({c.session_id for c in got}) == len(sessions)
    assert pages >= 2


# --- the budget follows the configured message size -------------------------------------------

SMALL = 64 * 1024  # a hub configured with 64 KiB messages


def wide_pattern(pattern_id: str) -> pb.Pattern:
    """A valid pattern of ~34 KB: two of them do not fit one 64 KiB response."""
    wide = pattern(pattern_id)
    wide.attributes.update({f"key_{j}": "v" * 1024 for j in range(32)})
    return wide


async def test_every_response_fits_a_smaller_configured_message_size(database_url: str) -> None:
    """Live events, the training sync and ListAgents pages all keep to
    `max_message_bytes`, not to a constant of their own."""
    server = HubServer(make_config(database_url, max_message_bytes=SMALL))
    await server.start()
    harness = HubHarness(server)
    try:
        capabilities = [f"{c}{'_' * 62}{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
        capabilities += [f"x{i:02d}{'_' * 60}y" for i in range(38)]  # 64 of 64 characters
        for i in range(16):  # ~4.9 KB each: 16 overflow 64 KiB
            agent = f"wide_{i:02d}"
            wide = hello(agent, capabilities=capabilities)
            wide.version = FOUR_BYTE * 200
            trainer = await harness.connect(agent, wide)
            await trainer.close()
        alice = await harness.connect("alice")
        bob = await harness.connect("bob")
        sent = []
        for i in range(6):
            sent.append(
                await alice.send(share_pattern=pb.SharePattern(pattern=wide_pattern(f"w{i}")))
            )
        receipts = [await alice.receipt(mid) for mid in sent]
        await bob.until_seq(receipts[-1].seq)
        shared = [e.seq for e in bob.events if e.HasField("artifact_shared")]
        assert shared == [r.seq for r in receipts]
        late = await harness.connect("late")
        sync = await asyncio.wait_for(_first_sync(late), WAIT)
        assert 0 < len(sync.knowledge_base.recent_artifacts) < 5
        assert sync.knowledge_base.pattern_count == 6

        async def fetch(token: str) -> Any:
            page = await harness.query(
                "ListAgents", pb.ListAgentsRequest(page_size=500, page_token=token)
            )
            assert page.ByteSize() <= SMALL
            return page

        agents, pages = await all_pages(fetch, "agents")
        assert len({a.agent_id for a in agents}) == len(agents) == 16 + 3  # alice, bob, late
        assert pages >= 2
    finally:
        await harness.close()
        await server.stop()

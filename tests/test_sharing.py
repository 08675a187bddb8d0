"""Shares are validated, persisted, broadcast, acknowledged once, and replayed on resume."""

from __future__ import annotations

from typing import Any

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb

from .conftest import HubHarness, code_component, hello, os_component, pattern

SHARES: dict[str, tuple[Any, Any]] = {
    "share_pattern": (pb.SharePattern(pattern=pattern()), pb.ARTIFACT_KIND_PATTERN),
    "share_code_component": (
        pb.ShareCodeComponent(code_component=code_component()),
        pb.ARTIFACT_KIND_CODE_COMPONENT,
    ),
    "share_os_component": (
        pb.ShareOsComponent(os_component=os_component()),
        pb.ARTIFACT_KIND_OS_COMPONENT,
    ),
}


@pytest.mark.parametrize("kind", sorted(SHARES))
async def test_share_is_stored_broadcast_and_acknowledged(harness: HubHarness, kind: str) -> None:
    body, artifact_kind = SHARES[kind]
    sender = await harness.connect("AI_Node_1")
    peers = [await harness.connect(f"AI_Node_{i}") for i in (2, 3)]
    message_id = await sender.send(**{kind: body})
    receipt = await sender.receipt(message_id)
    assert receipt.seq > 0 and receipt.resource_id.startswith("art_") and not receipt.duplicate

    for peer in peers:
        event = await peer.event("artifact_shared", artifact_id=receipt.resource_id)
        assert event.seq == receipt.seq
        assert event.sender_id == "AI_Node_1"
        assert event.artifact_shared.contributor_id == "AI_Node_1"
        assert event.artifact_shared.kind == artifact_kind
    # The sender is not sent its own share.
    assert not any(e.WhichOneof("body") == "artifact_shared" for e in sender.events)

    stored = await harness.query(
        "GetArtifact", pb.GetArtifactRequest(artifact_id=receipt.resource_id)
    )
    assert stored.artifact == (await peers[0].event("artifact_shared")).artifact_shared
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest(kind=artifact_kind))
    assert [a.artifact_id for a in listed.artifacts] == [receipt.resource_id]


async def test_repeated_message_id_is_acknowledged_again_not_stored_twice(
    harness: HubHarness,
) -> None:
    sender = await harness.connect("AI_Node_1")
    peer = await harness.connect("AI_Node_2")
    first = await sender.receipt(
        await sender.send("same-id", share_pattern=pb.SharePattern(pattern=pattern()))
    )
    # A resend (the same message again; another body under the same id is ALREADY_EXISTS:
    # tests/test_message_id_reuse.py).
    await sender.send("same-id", share_pattern=pb.SharePattern(pattern=pattern()))
    # Receipts are keyed by message_id: wait for the second one to replace the first.
    del sender.receipts["same-id"]
    again = await sender.receipt("same-id")
    assert again.duplicate
    assert (again.seq, again.resource_id) == (first.seq, first.resource_id)
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert len(listed.artifacts) == 1
    # Another agent may use the same message_id: ids are scoped per agent.
    other = await peer.receipt(
        await peer.send("same-id", share_pattern=pb.SharePattern(pattern=pattern()))
    )
    assert not other.duplicate and other.resource_id != first.resource_id


async def test_reconnecting_trainer_gets_every_missed_event_once_in_order(
    harness: HubHarness,
) -> None:
    reader = await harness.connect("AI_Node_1")
    writer = await harness.connect("AI_Node_2")
    before = await writer.receipt(
        await writer.send(share_pattern=pb.SharePattern(pattern=pattern("before")))
    )
    await reader.until_seq(before.seq)
    last_processed = reader.events[-1].seq
    await reader.close()
    await writer.left("AI_Node_1")

    missed = []
    for i in range(150):  # more than one replay response (64 events each)
        receipt = await writer.receipt(
            await writer.send(share_pattern=pb.SharePattern(pattern=pattern(f"missed{i}")))
        )
        missed.append(receipt.resource_id)

    resumed = await harness.connect(
        "AI_Node_1", hello("AI_Node_1", resume_after_seq=last_processed)
    )
    live = await writer.receipt(
        await writer.send(share_pattern=pb.SharePattern(pattern=pattern("live")))
    )
    await resumed.until_seq(live.seq)
    seqs = [e.seq for e in resumed.events]
    assert seqs == sorted(set(seqs)), "events must arrive once each, in seq order"
    assert all(s > last_processed for s in seqs)
    shared = [
        e.artifact_shared.artifact_id for e in resumed.events if e.HasField("artifact_shared")
    ]
    assert shared == [*missed, live.resource_id]


async def test_fresh_start_replays_history(harness: HubHarness) -> None:
    writer = await harness.connect("AI_Node_2")
    receipts = [
        await writer.receipt(
            await writer.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        )
        for i in range(3)
    ]
    late = await harness.connect("AI_Node_1")
    assert late.welcome.head_seq >= receipts[-1].seq
    for receipt in receipts:
        await late.event("artifact_shared", artifact_id=receipt.resource_id)


async def test_list_artifacts_pages_and_filters(harness: HubHarness) -> None:
    a = await harness.connect("AI_Node_1")
    b = await harness.connect("AI_Node_2")
    for i in range(5):
        await a.receipt(await a.send(share_pattern=pb.SharePattern(pattern=pattern(f"a{i}"))))
    await b.receipt(
        await b.send(share_code_component=pb.ShareCodeComponent(code_component=code_component()))
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await harness.query(
            "ListArtifacts",
            pb.ListArtifactsRequest(contributor_id="AI_Node_1", page_size=2, page_token=token),
        )
        seen += [x.artifact_id for x in page.artifacts]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 5
    assert seen == sorted(seen, reverse=True)  # newest first; ids are time-ordered
    code = await harness.query(
        "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_CODE_COMPONENT)
    )
    assert [x.contributor_id for x in code.artifacts] == ["AI_Node_2"]

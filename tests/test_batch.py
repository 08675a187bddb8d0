"""A RequestBatch is handled request by request, as if each had come alone; a malformed
batch is refused as a whole with one error and nothing of it is handled."""

from __future__ import annotations

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.validation import Limits

from .conftest import HubHarness, hello, pattern

INVALID_ARGUMENT = 3


def share(message_id: str, pattern_id: str) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        message_id=message_id, share_pattern=pb.SharePattern(pattern=pattern(pattern_id))
    )


async def stored_pattern_ids(harness: HubHarness) -> list[str]:
    listed = await harness.query(
        "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_PATTERN, page_size=100)
    )
    return sorted(a.pattern.pattern_id for a in listed.artifacts)


async def test_each_request_of_a_batch_is_stored_routed_and_answered_by_its_own_id(
    harness: HubHarness,
) -> None:
    sender = await harness.connect("AI_Node_1")
    peer = await harness.connect("AI_Node_2")
    assert sender.welcome.max_batch_requests == Limits().max_batch_requests
    items = [share(f"m{i}", f"p{i}") for i in range(5)]
    await sender.send("batch-1", batch=pb.RequestBatch(requests=items))
    receipts = [await sender.receipt(f"m{i}") for i in range(5)]
    assert [r.seq for r in receipts] == sorted({r.seq for r in receipts}), "in order, once each"
    assert "batch-1" not in sender.receipts and "batch-1" not in sender.errors
    await peer.until_seq(receipts[-1].seq)
    seen = [
        e.artifact_shared.pattern.pattern_id for e in peer.events if e.HasField("artifact_shared")
    ]
    assert seen == [f"p{i}" for i in range(5)]
    assert await stored_pattern_ids(harness) == [f"p{i}" for i in range(5)]


async def test_one_bad_request_in_a_batch_costs_only_itself(harness: HubHarness) -> None:
    sender = await harness.connect("AI_Node_1")
    bad = pb.ConnectRequest(
        message_id="bad", share_pattern=pb.SharePattern(pattern=pattern("p", confidence=7.0))
    )
    again = share("good-0", "dup")  # the same message_id twice: acknowledged twice, stored once
    batch = [share("good-0", "p0"), bad, share("good-1", "p1"), again]
    await sender.send("batch-2", batch=pb.RequestBatch(requests=batch))
    error = await sender.error("bad")
    assert error.code == INVALID_ARGUMENT
    assert any("confidence" in v.field for v in error.field_violations)
    first, second = await sender.receipt("good-0"), await sender.receipt("good-1")
    assert first.seq < second.seq
    assert await stored_pattern_ids(harness) == ["p0", "p1"]
    # The stream goes on.
    mid = await sender.send(share_pattern=pb.SharePattern(pattern=pattern("after")))
    assert (await sender.receipt(mid)).seq > second.seq


@pytest.mark.parametrize(
    ("requests", "field", "why"),
    [
        ([], "batch.requests", "is empty"),
        ([share(f"m{i}", f"p{i}") for i in range(65)], "batch.requests", "at most 64"),
        (
            [share("m0", "p0"), pb.ConnectRequest(message_id="h", hello=hello("AI_Node_1"))],
            "batch.requests[1]",
            "is a hello",
        ),
        (
            [share("m0", "p0"), pb.ConnectRequest(message_id="n", batch=pb.RequestBatch())],
            "batch.requests[1]",
            "is a batch",
        ),
    ],
    ids=["empty", "too-many", "hello-inside", "batch-inside"],
)
async def test_a_malformed_batch_is_refused_whole(
    harness: HubHarness, requests: list[pb.ConnectRequest], field: str, why: str
) -> None:
    sender = await harness.connect("AI_Node_1")
    await sender.send("whole", batch=pb.RequestBatch(requests=requests))
    error = await sender.error("whole")
    assert error.code == INVALID_ARGUMENT
    assert any(v.field == field and why in v.description for v in error.field_violations), error
    # Nothing of it was handled, and the stream goes on.
    after = await sender.receipt(
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern("after")))
    )
    assert after.seq > 0
    assert await stored_pattern_ids(harness) == ["after"]
    assert not any(mid in sender.receipts for mid in ("m0", "h", "n"))

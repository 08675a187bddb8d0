"""A message_id reused for a different message is refused (ALREADY_EXISTS naming the
first seq), not answered with the first one's receipt; the same message again is still
a duplicate. On SQLite and PostgreSQL, across commits and within one batch."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig

from .conftest import WAIT, HubHarness, RawTrainer, code_component, make_config, pattern

ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]


@pytest.fixture
def hub_config(store_url: str) -> HubConfig:
    return make_config(store_url)


def share(pattern_id: str, confidence: float = 0.9) -> pb.SharePattern:
    return pb.SharePattern(pattern=pattern(pattern_id, confidence))


async def answer_again(trainer: RawTrainer, message_id: str, **body: object) -> object:
    """Send `message_id` once more and wait for its new answer (not the cached one)."""
    trainer.receipts.pop(message_id, None)
    trainer.errors.pop(message_id, None)
    await trainer.send(message_id, **body)
    return await trainer.answer(message_id)


def assert_conflict(error: object, message_id: str, first_seq: int) -> None:
    assert isinstance(error, pb.RequestError), f"expected an error, got receipt {error}"
    assert (error.code, error.code_name) == (ALREADY_EXISTS, "ALREADY_EXISTS"), error
    assert error.message == (
        f"message_id {message_id} was already used for a different message "
        f"(seq {first_seq}); use a new message_id"
    ), error.message


async def artifact_count(harness: HubHarness) -> int:
    listing = await harness.query("ListArtifacts", pb.ListArtifactsRequest(page_size=100))
    return len(listing.artifacts)


async def test_reuse_with_another_body_is_refused_and_stores_nothing(harness: HubHarness) -> None:
    trainer = await harness.connect("reuser")
    first = await trainer.receipt(await trainer.send("m1", share_pattern=share("p1")))

    same = await answer_again(trainer, "m1", share_pattern=share("p1"))
    assert isinstance(same, pb.Receipt) and same.duplicate, same
    assert (same.seq, same.resource_id) == (first.seq, first.resource_id)

    # Another body, then another kind of message, under the same id: both refused.
    assert_conflict(await answer_again(trainer, "m1", share_pattern=share("p2")), "m1", first.seq)
    other_kind = pb.ShareCodeComponent(code_component=code_component())
    assert_conflict(
        await answer_again(trainer, "m1", share_code_component=other_kind), "m1", first.seq
    )
    # From another stream too (the ledger in the database, not this stream's memory).
    await trainer.close()
    again = await harness.connect("reuser")
    assert_conflict(
        await answer_again(again, "m1", share_pattern=share("p1", 0.5)), "m1", first.seq
    )
    still = await answer_again(again, "m1", share_pattern=share("p1"))
    assert isinstance(still, pb.Receipt) and still.duplicate and still.seq == first.seq, still
    assert await artifact_count(harness) == 1
    await again.close()


async def test_reuse_within_one_batch(harness: HubHarness) -> None:
    trainer = await harness.connect("batcher")
    requests = [
        pb.ConnectRequest(message_id="b-1", share_pattern=share("p1")),
        pb.ConnectRequest(message_id="b-1", share_pattern=share("p2")),
        pb.ConnectRequest(message_id="b-2", share_pattern=share("p3")),
        pb.ConnectRequest(message_id="b-2", share_pattern=share("p3")),
    ]
    await trainer.send("batch", batch=pb.RequestBatch(requests=requests))
    # Two answers per id, in the order the requests were handled.
    answers: dict[str, list[object]] = {"b-1": [], "b-2": []}
    while sum(map(len, answers.values())) < 4:
        response = await asyncio.wait_for(trainer.call.read(), WAIT)
        assert isinstance(response, pb.ConnectResponse), response
        for receipt in response.receipts:
            answers[receipt.message_id].append(receipt)
        for error in response.errors:
            answers[error.message_id].append(error)
    (first, conflict) = answers["b-1"]
    assert isinstance(first, pb.Receipt) and not first.duplicate, first
    assert_conflict(conflict, "b-1", first.seq)
    (original, duplicate) = answers["b-2"]
    assert isinstance(original, pb.Receipt) and isinstance(duplicate, pb.Receipt)
    assert not original.duplicate and duplicate.duplicate and duplicate.seq == original.seq
    assert await artifact_count(harness) == 2
    await trainer.close()

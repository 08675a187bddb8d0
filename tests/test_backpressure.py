"""A consumer that stops reading costs the hub bounded memory and still gets everything, in order."""

from __future__ import annotations

import asyncio

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer

from .conftest import HubHarness, RawTrainer, code_component, make_config

QUEUE = 32
REPLAY_PAGE = 64
CODE = "/* padding so flow-control windows fill quickly */\n" * 300  # ~16 KB


@pytest.fixture
def hub_config(database_url: str) -> HubConfig:
    return make_config(database_url, outbound_queue_size=QUEUE, replay_page_size=REPLAY_PAGE)


async def test_stalled_reader_is_bounded_then_catches_up_in_order(
    hub: HubServer, harness: HubHarness
) -> None:
    stalled = await harness.connect("AI_Node_1")
    writers = [await harness.connect(f"AI_Node_{i}") for i in range(2, 6)]
    connection = next(c for c in hub.router.connections() if c.agent_id == "AI_Node_1")

    async def share_many(writer: RawTrainer, count: int) -> list[pb.Receipt]:
        receipts = []
        for i in range(count):
            mid = await writer.send(
                share_code_component=pb.ShareCodeComponent(
                    code_component=code_component(
                        f"c{i}", CODE + f"int f{i}(void) {{ return {i}; }}\n"
                    )
                )
            )
            receipts.append(await writer.receipt(mid))
        return receipts

    # Meanwhile the stalled trainer reads nothing at all.
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, len(connection._events))
            await asyncio.sleep(0)  # yield to the hub; sample after every loop turn

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(share_many(w, 250) for w in writers))
    watcher.cancel()
    expected = sorted(r.resource_id for batch in results for r in batch)

    assert connection.fell_behind > 0, "the test must overflow the live queue"
    assert peak <= QUEUE + REPLAY_PAGE, f"outbound queue grew to {peak}"

    last = max(r.seq for batch in results for r in batch)
    await stalled.until_seq(last)
    seqs = [e.seq for e in stalled.events]
    assert seqs == sorted(set(seqs)), "every event once, in seq order"
    got = sorted(
        e.artifact_shared.artifact_id for e in stalled.events if e.HasField("artifact_shared")
    )
    assert got == expected

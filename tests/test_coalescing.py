"""A busy stream's events coalesce into one response per linger, and a busy hub's commands into
one commit per commit linger; an idle stream is written at once, an idle hub commits at once.
Here the lingers are fixed (`lingers_follow_load` off); the last test has them follow the load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from grpc.aio import EOF

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer

from .conftest import WAIT, HubHarness, HubProcess, auth, free_port, hello, make_config, pattern
from .test_metrics import scrape, value

LINGER = 2.0
FACTOR = "kernelhub_linger_factor"


@pytest.fixture
def hub_config(request: pytest.FixtureRequest, database_url: str) -> HubConfig:
    """A fixed stream linger of LINGER; tests override settings with indirect parameters."""
    overrides = {
        "stream_linger": LINGER,
        "lingers_follow_load": False,
        **getattr(request, "param", {}),
    }
    return make_config(database_url, **overrides)


async def test_events_of_separate_commits_share_one_response_within_the_linger(
    harness: HubHarness,
) -> None:
    senders = [await harness.connect(f"AI_Node_{i}") for i in (2, 3, 4)]
    # Let the senders' streams go idle (their welcome was their last write), so each
    # one's receipt goes out at once rather than after the linger.
    await asyncio.sleep(LINGER)
    receiver = await harness.connect("AI_Node_1")  # just written to: busy for LINGER
    shared = []
    for i, sender in enumerate(senders):
        # One at a time, each waiting for its receipt: three separate commits. Were an
        # idle stream's receipt held back too, these would take 3 x LINGER and spread.
        mid = await sender.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        shared.append((await sender.receipt(mid)).seq)

    response = await asyncio.wait_for(receiver.call.read(), WAIT)
    assert response is not EOF
    shares = [e.seq for e in response.events if e.WhichOneof("body") == "artifact_shared"]
    assert shares == shared, "one response carries all three"


@pytest.mark.parametrize("hub_config", [{"stream_linger": WAIT * 10}], indirect=True)
async def test_an_ended_stream_is_not_held_by_its_linger(harness: HubHarness) -> None:
    """A trainer that closes its side right after sending gets its receipt and the
    stream's status, however recently the stream was written."""
    trainer = await harness.connect("AI_Node_1")
    mid = await trainer.send(share_pattern=pb.SharePattern(pattern=pattern("last")))
    await trainer.call.done_writing()
    assert (await trainer.receipt(mid)).seq > 0
    assert await asyncio.wait_for(trainer.call.read(), WAIT) is EOF


@pytest.mark.parametrize("hub_config", [{"stream_linger": WAIT * 10}], indirect=True)
async def test_receipts_are_never_held_by_the_linger(harness: HubHarness) -> None:
    """A trainer that waits for each receipt before its next message: were receipts held
    like events, each after the first would take the (here enormous) linger."""
    trainer = await harness.connect("AI_Node_1")
    seqs = []
    for i in range(5):
        mid = await trainer.send(share_pattern=pb.SharePattern(pattern=pattern(f"s{i}")))
        seqs.append((await trainer.receipt(mid)).seq)
    assert seqs == sorted(set(seqs))


async def commits_for_three_shares(hub: HubServer, harness: HubHarness) -> int:
    """Three shares written back to back just after a trainer's presence was committed:
    the commits they took, once each is receipted, in order."""
    trainer = await harness.connect("AI_Node_1")  # its presence was just committed
    before = hub.committer.commits
    mids = [
        await trainer.send(share_pattern=pb.SharePattern(pattern=pattern(f"c{i}")))
        for i in range(3)
    ]
    seqs = [(await trainer.receipt(mid)).seq for mid in mids]
    assert seqs == sorted(set(seqs))
    return hub.committer.commits - before


@pytest.mark.parametrize("hub_config", [{"commit_linger": 1.0}], indirect=True)
async def test_commands_arriving_within_the_commit_linger_share_one_commit(
    hub: HubServer, harness: HubHarness
) -> None:
    """Three shares written back to back just after a commit: the first would otherwise
    be committed alone the moment it arrives, the other two after it."""
    assert await commits_for_three_shares(hub, harness) == 1


@pytest.mark.parametrize(
    "hub_config",
    [{"commit_linger": 1.0, "commit_batch_bytes": 1, "reaper_interval": 3600}],
    indirect=True,
)
async def test_a_commit_also_ends_at_its_byte_bound(hub: HubServer, harness: HubHarness) -> None:
    """The same three shares with a byte bound below one message: each its own commit (the
    first of a batch always goes), in order. (No expiry sweep: it would commit on its own
    within the linger.)"""
    assert await commits_for_three_shares(hub, harness) == 3


async def test_a_hub_that_is_nearly_idle_does_not_linger(tmp_path: Path) -> None:
    """Lingers following the load (the default): a hub process using a sliver of a core
    writes each event at once, however long its stream linger. Fixed, this linger (three
    times the test's deadline) would hold the second share's event past it, as the first
    test here shows with a shorter one; a passing fraction of it would not."""
    metrics_port = free_port()
    hub = HubProcess(
        tmp_path / "hub.db",
        KERNELHUB_STREAM_LINGER=str(WAIT * 3),
        KERNELHUB_METRICS_PORT=str(metrics_port),
    )
    tokens = await hub.issue_tokens("AI_Node_1", "AI_Node_2")
    async with hub:
        async with asyncio.timeout(WAIT):  # the hub says its streams linger not at all now
            while value(  # noqa: ASYNC110
                await asyncio.to_thread(scrape, metrics_port), FACTOR, linger="stream"
            ):
                await asyncio.sleep(0.05)
        calls = {}
        for agent_id in tokens:
            call = hub.stub().Connect(metadata=auth(tokens[agent_id]))
            await call.write(pb.ConnectRequest(message_id="hello", hello=hello(agent_id)))
            first = await asyncio.wait_for(call.read(), WAIT)
            assert first is not EOF and first.HasField("welcome")
            calls[agent_id] = call
        sender, receiver = calls["AI_Node_1"], calls["AI_Node_2"]
        shared = []
        for i in range(2):  # two commits: each share waits for its receipt
            await sender.write(
                pb.ConnectRequest(
                    message_id=f"m{i}", share_pattern=pb.SharePattern(pattern=pattern(f"p{i}"))
                )
            )
            while True:
                response = await asyncio.wait_for(sender.read(), WAIT)
                assert response is not EOF
                if receipts := [r.seq for r in response.receipts if r.message_id == f"m{i}"]:
                    shared.extend(receipts)
                    break
        delivered: list[int] = []
        async with asyncio.timeout(WAIT):
            while delivered != shared:
                response = await receiver.read()
                assert response is not EOF
                delivered += [
                    e.seq for e in response.events if e.WhichOneof("body") == "artifact_shared"
                ]
        for call in calls.values():
            call.cancel()

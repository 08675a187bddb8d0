"""Fields the contract promises and the hub once left unset: the end-of-replay marker,
GetHubStats.start_time and recent_artifacts, and last_seen_time in a training sync."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.server import HubServer
from trainer_service.sdk.client import HubClient

from .conftest import EOF, WAIT, HubHarness, auth, hello, make_config, pattern, target


async def _read(call: grpc.aio.StreamStreamCall) -> pb.ConnectResponse:
    response = await asyncio.wait_for(call.read(), WAIT)
    assert response is not EOF, "the stream ended"
    assert isinstance(response, pb.ConnectResponse)
    return response


async def test_replay_ends_with_one_marker_then_live_events(harness: HubHarness) -> None:
    sharer = await harness.connect("AI_Node_1")
    shared = [
        await sharer.receipt(
            await sharer.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        )
        for i in range(3)
    ]

    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_2")))
    await call.write(pb.ConnectRequest(message_id="hello", hello=hello("AI_Node_2")))
    response = await _read(call)  # the welcome, with what was ready beside it
    welcome = response.welcome
    replayed: list[pb.HubEvent] = []
    while True:
        replayed.extend(response.events)
        if response.HasField("replay_complete"):
            marker = response.replay_complete
            break
        response = await _read(call)
    seqs = [e.seq for e in replayed]
    assert {r.seq for r in shared} <= set(seqs), "every share is replayed before the marker"
    assert seqs == sorted(seqs)
    assert marker.seq == max([welcome.head_seq, *seqs])

    live = await sharer.receipt(
        await sharer.send(share_pattern=pb.SharePattern(pattern=pattern("p_live")))
    )
    after: list[pb.HubEvent] = []
    while live.seq not in [e.seq for e in after]:
        response = await _read(call)
        assert not response.HasField("replay_complete"), "the marker is sent once"
        after.extend(response.events)
    assert all(e.seq > marker.seq for e in after)
    call.cancel()


async def test_replay_marker_with_skip_history_is_the_welcome_head(harness: HubHarness) -> None:
    sharer = await harness.connect("AI_Node_1")
    await sharer.receipt(await sharer.send(share_pattern=pb.SharePattern(pattern=pattern())))
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_2")))
    await call.write(
        pb.ConnectRequest(message_id="hello", hello=hello("AI_Node_2", skip_history=True))
    )
    response = await _read(call)  # the welcome, with what was ready beside it
    welcome = response.welcome
    while not response.HasField("replay_complete"):
        assert not response.events, "skip_history replays nothing"
        response = await _read(call)
    assert not response.events
    assert response.replay_complete.seq == welcome.head_seq
    call.cancel()


async def test_hub_stats_start_time_is_the_hubs_start(database_url: str) -> None:
    before = datetime.now(UTC)
    server = HubServer(make_config(database_url))
    await server.start()
    after = datetime.now(UTC)
    harness = HubHarness(server)
    try:
        stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert stats.HasField("start_time")
        assert before <= stats.start_time.ToDatetime(UTC) <= after
        again = await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert again.start_time == stats.start_time
    finally:
        await harness.close()
        await server.stop()


async def test_hub_stats_list_the_newest_artifacts(harness: HubHarness) -> None:
    sharer = await harness.connect("AI_Node_1")
    ids = [
        (
            await sharer.receipt(
                await sharer.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
            )
        ).resource_id
        for i in range(2)
    ]
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert [a.artifact_id for a in stats.knowledge_base.recent_artifacts] == ids[::-1]
    assert stats.knowledge_base.pattern_count == 2


async def test_training_sync_says_when_each_active_agent_was_last_seen(
    harness: HubHarness,
) -> None:
    first = await harness.connect("AI_Node_1")
    second = await harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    while not second.syncs:
        await second._read_one()
    (listed,) = [a for a in second.syncs[0].active_agents if a.agent_id == "AI_Node_1"]
    assert listed.HasField("last_seen_time")
    joined = await second.joined("AI_Node_1")  # from the roster
    # The time the hub stored when AI_Node_1 connected, as ListAgents and presence say.
    assert listed.last_seen_time == joined.last_seen_time
    agents = await harness.query("ListAgents", pb.ListAgentsRequest(online_only=True))
    (stored,) = [a for a in agents.agents if a.agent_id == "AI_Node_1"]
    assert listed.last_seen_time == stored.last_seen_time
    await first.close()


async def test_hub_client_says_when_replay_is_done(harness: HubHarness) -> None:
    sharer = await harness.connect("AI_Node_1")
    shared = [
        await sharer.receipt(
            await sharer.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        )
        for i in range(3)
    ]
    async with HubClient(
        target(harness.server),
        "AI_Node_2",
        await harness.token("AI_Node_2"),
        specialization=pb.SPECIALIZATION_NETWORKING,
        capabilities=["network_protocols"],
    ) as late:
        async with asyncio.timeout(WAIT):
            await late.replayed.wait()
        assert late.welcome is not None
        assert late.replay_seq == max(late.welcome.head_seq, late.last_seq)
        # Everything replayed is buffered by the time the marker counts.
        assert late.last_seq >= shared[-1].seq

"""The Connect stream's lifecycle: authentication, Hello, Welcome, supersession."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.server import HubServer

from .conftest import WAIT, HubHarness, auth, hello, make_config, pattern

# A refused token ends the stream as it opens, before any message is read: these tests read
# the status without writing a Hello first. A write that loses the race with that status
# fails client-side, and grpc-python then marks the call INTERNAL ("Internal error from
# Core"), so the refusal's own status would be lost (seen once in a full run under load).


async def _first_status(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call.read(), WAIT)
    return raised.value


async def test_missing_token_is_unauthenticated_on_stream_and_unary(harness: HubHarness) -> None:
    call = harness.stub.Connect()
    error = await _first_status(call)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (error.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.stub.GetHubStats(pb.GetHubStatsRequest(), timeout=WAIT)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("header", ["Bearer kh_not_a_real_token", "Basic abc", "Bearer "])
async def test_wrong_token_is_unauthenticated(harness: HubHarness, header: str) -> None:
    call = harness.stub.Connect(metadata=[("authorization", header)])
    assert (await _first_status(call)).code() == grpc.StatusCode.UNAUTHENTICATED


async def test_revoked_and_expired_tokens_are_refused(harness: HubHarness) -> None:
    token = await harness.token("AI_Node_1")
    assert await harness.server.store.revoke_tokens("AI_Node_1") == 1
    expired = await harness.server.issue_token("AI_Node_2", ttl=timedelta(seconds=-1))
    for tok in (token, expired):
        call = harness.stub.Connect(metadata=auth(tok))
        error = await _first_status(call)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (error.details() or "")


async def test_hello_for_another_agent_is_permission_denied(harness: HubHarness) -> None:
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
    await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_2")))
    error = await _first_status(call)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "AI_Node_1" in (error.details() or "") and "AI_Node_2" in (error.details() or "")
    agents = await harness.query("ListAgents", pb.ListAgentsRequest())
    assert [a.agent_id for a in agents.agents] == []  # the spoofed hello stored nothing


async def test_first_message_must_be_hello(harness: HubHarness) -> None:
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
    await call.write(
        pb.ConnectRequest(message_id="m", share_pattern=pb.SharePattern(pattern=pb.Pattern()))
    )
    error = await _first_status(call)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "first message must be hello" in (error.details() or "")


async def test_invalid_hello_names_the_fields(harness: HubHarness) -> None:
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
    bad = pb.Hello(agent_id="AI_Node_1", capabilities=["Not Snake"])
    await call.write(pb.ConnectRequest(message_id="h", hello=bad))
    error = await _first_status(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello.specialization" in (error.details() or "")
    assert "hello.capabilities[0]" in (error.details() or "")


async def test_health_and_reflection_need_no_token(harness: HubHarness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "kernelhub.v1.HubService"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "kernelhub.v1.HubService" in names


async def test_welcome_then_presence_and_sync(harness: HubHarness) -> None:
    first = await harness.connect("AI_Node_1")
    assert first.welcome.agent_id == "AI_Node_1"
    second = await harness.connect(
        "AI_Node_2",
        hello("AI_Node_2", pb.SPECIALIZATION_SECURITY, capabilities=["security_analysis"]),
    )
    # Presence is state: the roster (empty for the first agent), then the join.
    await first.until_roster()
    assert first.welcome.roster_size == 0
    joined = await first.joined("AI_Node_2")
    assert joined.specialization == pb.SPECIALIZATION_SECURITY
    assert list(joined.capabilities) == ["security_analysis"]
    assert joined.online
    assert second.welcome.roster_size == 1
    await second.until_roster()
    assert list(second.online) == ["AI_Node_1"]
    # The newcomer's sync lists the other agent and the complementary pairing.
    while not second.syncs:
        await second._read_one()
    sync = second.syncs[-1]
    assert [a.agent_id for a in sync.active_agents] == ["AI_Node_1"]
    assert [o.agent_id for o in sync.opportunities] == ["AI_Node_1"]
    assert sync.opportunities[0].score > 0
    await second.close()
    await first.left("AI_Node_2")
    assert "AI_Node_2" not in first.online
    # Neither the join nor the leave is in the event log.
    assert first.events == []
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert (stats.agents_known, stats.agents_online) == (2, 1)


async def test_the_welcome_comes_in_one_write_with_what_is_ready_beside_it(
    harness: HubHarness,
) -> None:
    """A connect's first response carries the welcome and what is ready with it: the first
    training sync, the roster (small enough for one part) and the end of the (empty) replay,
    handled in field order, so a connect costs the hub one stream write, not three."""
    await harness.connect("AI_Node_1")
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_2")))
    await call.write(pb.ConnectRequest(message_id="hello", hello=hello("AI_Node_2")))
    first = await asyncio.wait_for(call.read(), WAIT)
    assert isinstance(first, pb.ConnectResponse)
    assert first.welcome.agent_id == "AI_Node_2" and first.welcome.roster_size == 1
    assert [a.agent_id for a in first.training_sync.active_agents] == ["AI_Node_1"]
    assert first.presence.roster and first.presence.roster_complete
    assert [a.agent_id for a in first.presence.online] == ["AI_Node_1"]
    assert first.replay_complete.seq == first.welcome.head_seq
    call.cancel()


async def test_new_connection_supersedes_the_old_one(harness: HubHarness) -> None:
    old = await harness.connect("AI_Node_1")
    new = await harness.connect("AI_Node_1")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while True:
            await old._read_one()
    assert raised.value.code() == grpc.StatusCode.ABORTED
    assert "superseded" in (raised.value.details() or "")
    # The new stream works, and the agent stays online.
    message_id = await new.send(share_pattern=pb.SharePattern(pattern=pattern()))
    assert (await new.receipt(message_id)).seq > 0
    agents = await harness.query("ListAgents", pb.ListAgentsRequest(online_only=True))
    assert [a.agent_id for a in agents.agents] == ["AI_Node_1"]


async def test_training_sync_arrives_periodically_with_knowledge_counts(database_url: str) -> None:
    server = HubServer(make_config(database_url, training_sync_interval=0.2))
    await server.start()
    harness = HubHarness(server)
    try:
        agent = await harness.connect("AI_Node_1")
        writer = await harness.connect("AI_Node_2")
        await writer.receipt(await writer.send(share_pattern=pb.SharePattern(pattern=pattern())))
        assert agent.welcome.training_sync_interval_seconds == pytest.approx(0.2)
        while not any(s.knowledge_base.pattern_count == 1 for s in agent.syncs):
            await agent._read_one()
        latest = agent.syncs[-1]
        assert [a.agent_id for a in latest.active_agents] == ["AI_Node_2"]
        assert latest.knowledge_base.recent_artifacts[0].pattern.pattern_id == "p1"
        count = len(agent.syncs)
        while len(agent.syncs) < count + 2:  # it keeps coming
            await agent._read_one()
    finally:
        await harness.close()
        await server.stop()


async def test_skip_history_starts_at_the_head(harness: HubHarness) -> None:
    writer = await harness.connect("AI_Node_2")
    old = await writer.receipt(
        await writer.send(share_pattern=pb.SharePattern(pattern=pattern("old")))
    )
    fresh = await harness.connect("AI_Node_1", hello("AI_Node_1", skip_history=True))
    assert fresh.welcome.head_seq >= old.seq
    new = await writer.receipt(
        await writer.send(share_pattern=pb.SharePattern(pattern=pattern("new")))
    )
    await fresh.until_seq(new.seq)
    assert all(e.seq > old.seq for e in fresh.events), "nothing from before the connect"
    shared = [
        e.artifact_shared.pattern.pattern_id for e in fresh.events if e.HasField("artifact_shared")
    ]
    assert shared == ["new"]

"""Reconnect churn: connects are rate-limited per agent, so one agent reconnecting in a loop
cannot flood every online agent with presence events."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer
from trainer_service.sdk.client import HubClient

from .conftest import EOF, WAIT, HubHarness, auth, hello, make_config

BURST = 5
RATE = 0.5  # connects per second after the burst
ATTEMPTS = 40


@pytest.fixture
def hub_config(database_url: str) -> HubConfig:
    return make_config(database_url, connect_rate_per_second=RATE, connect_burst=BURST)


async def _connect_once(harness: HubHarness, agent_id: str) -> grpc.StatusCode:
    """Connect, say Hello, leave at once: OK if it was let in, else the refusal's code."""
    call = harness.stub.Connect(metadata=auth(await harness.token(agent_id)))
    await call.write(pb.ConnectRequest(message_id="hello", hello=hello(agent_id)))
    try:
        first = await asyncio.wait_for(call.read(), WAIT)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert f"too many connects for {agent_id}" in (error.details() or "")
        assert "retry in" in (error.details() or "")
        return error.code()
    assert first is not EOF and first.HasField("welcome")
    await call.done_writing()
    while await asyncio.wait_for(call.read(), WAIT) is not EOF:
        pass
    return grpc.StatusCode.OK


async def test_reconnect_churn_is_refused_beyond_the_burst(harness: HubHarness) -> None:
    observer = await harness.connect("AI_Node_1")
    loop = asyncio.get_running_loop()
    began = loop.time()
    codes = [await _connect_once(harness, "AI_Node_2") for _ in range(ATTEMPTS)]
    elapsed = loop.time() - began
    admitted = codes.count(grpc.StatusCode.OK)
    allowed = BURST + math.ceil(RATE * elapsed)
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == ATTEMPTS - admitted
    assert BURST <= admitted <= allowed, (admitted, allowed)

    # A marker after the churn: presence changes reach the observer in order, so every
    # change the churn made has reached it once the marker's join has.
    await harness.connect("AI_Node_3")
    await observer.joined("AI_Node_3")
    presence = [
        u
        for u in observer.presence
        if "AI_Node_2" in u.offline or any(a.agent_id == "AI_Node_2" for a in u.online)
    ]
    assert len(presence) <= 2 * admitted, (len(presence), admitted)
    # Presence is not in the log: the churn left no event behind.
    assert observer.events == []

    # HubClient takes the refusal as retryable: it backs off and gets in once a token is
    # back, instead of failing.
    client = HubClient(
        f"127.0.0.1:{harness.server.port}",
        "AI_Node_2",
        await harness.token("AI_Node_2"),
        specialization=pb.SPECIALIZATION_NETWORKING,
        backoff_base=0.1,
        backoff_cap=1.0,
        reconnect_timeout=WAIT * 3,
    )
    try:
        await asyncio.wait_for(client.start(), WAIT * 3)
    finally:
        await client.close()


async def test_rate_limit_buckets_are_bounded_however_many_agents_connect(
    database_url: str,
) -> None:
    """One bucket per agent, but not one per agent id ever seen: the table keeps at most
    twice the live connections the hub carries."""
    hub = HubServer(make_config(database_url, max_connections=2))
    await hub.start()
    harness = HubHarness(hub)
    try:
        for i in range(10):
            assert await _connect_once(harness, f"AI_Node_{i}") == grpc.StatusCode.OK
        assert (
            hub.servicer.sessions._connects is not None
            and hub.servicer.sessions._buckets is not None
        )
        assert len(hub.servicer.sessions._connects) <= 4
        assert len(hub.servicer.sessions._buckets) <= 4
    finally:
        await harness.close()
        await hub.stop()

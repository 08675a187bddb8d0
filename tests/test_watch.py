"""Watch: an observer's read-only feed of every event, replayed then live, exactly once in
order; a slow watcher falls back to the log and hurts nobody; a watcher is not an agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc
from hub_service.config import HubConfig
from hub_service.roles import Role
from hub_service.server import HubServer
from hub_service.testing import TestHub

from .conftest import (
    WAIT,
    HubHarness,
    RawTrainer,
    async_stub,
    auth,
    code_component,
    pattern,
    target,
)


class Watcher:
    """One Watch call, read into a list."""

    def __init__(
        self,
        harness: HubHarness,
        token: str,
        request: pb.WatchRequest,
        stub: hub_pb2_grpc.HubServiceAsyncStub | None = None,
    ) -> None:
        self.call = (stub or harness.stub).Watch(request, metadata=auth(token))
        self.head_seq: int | None = None
        self.events: list[pb.HubEvent] = []
        self.replay_complete: int | None = None
        self.online: set[str] = set()  # from presence: the roster, then changes
        self.roster_complete = False

    async def read_one(self) -> None:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        assert response is not grpc.aio.EOF, "the watch ended"
        if self.head_seq is None:
            self.head_seq = response.head_seq
        self.events.extend(response.events)
        if response.HasField("presence"):
            self.online |= {a.agent_id for a in response.presence.online}
            self.online -= set(response.presence.offline)
            self.roster_complete |= response.presence.roster_complete
        if response.HasField("replay_complete"):
            assert self.replay_complete is None, "replay_complete came twice"
            self.replay_complete = response.replay_complete.seq

    async def until_seq(self, seq: int) -> None:
        while not self.events or self.events[-1].seq < seq:
            await self.read_one()

    async def status(self) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await self.read_one()
        return ended.value


TRAINERS: dict[HubHarness, RawTrainer] = {}


async def share(harness: HubHarness, count: int, prefix: str) -> int:
    """`count` shares by the connected trainer; the last one's seq."""
    raw = TRAINERS[harness]
    ids = [
        await raw.send(share_pattern=pb.SharePattern(pattern=pattern(f"{prefix}{i}")))
        for i in range(count)
    ]
    return max([int((await raw.receipt(i)).seq) for i in ids])


@pytest.fixture
def hub_config(hub_config: HubConfig) -> HubConfig:
    # Small pages and queues, so replay takes several pages and a slow watcher overflows.
    return replace(
        hub_config, replay_page_size=7, outbound_queue_size=8, token_recheck_interval=0.2
    )


@pytest.fixture
async def watched(harness: HubHarness) -> AsyncIterator[HubHarness]:
    """The harness, with AI_Node_1 connected (`TRAINERS[harness]`)."""
    TRAINERS[harness] = await harness.connect("AI_Node_1")
    yield harness
    del TRAINERS[harness]


async def observer(harness: HubHarness, name: str = "dash", role: Role = Role.OBSERVER) -> str:
    return await harness.token(name, role=role)


async def test_replay_then_live_exactly_once_in_order(watched: HubHarness) -> None:
    before = await share(watched, 20, "old")  # three replay pages and more
    watcher = Watcher(watched, await observer(watched), pb.WatchRequest())
    # Shares committed while the replay runs must come once, replayed or live.
    racing = asyncio.create_task(share(watched, 20, "racing"))
    await watcher.read_one()
    assert watcher.head_seq is not None and watcher.head_seq >= before
    last = await racing
    while watcher.replay_complete is None:
        await watcher.read_one()
    live = await share(watched, 5, "live")
    await watcher.until_seq(live)
    seqs = [e.seq for e in watcher.events]
    head = (await watched.query("GetHubStats", pb.GetHubStatsRequest())).head_seq
    assert seqs == list(range(1, head + 1)), "every event of the log, once, in order"
    assert watcher.replay_complete >= watcher.head_seq
    assert last < live
    watcher.call.cancel()


async def test_a_watcher_gets_the_roster_then_presence_changes(watched: HubHarness) -> None:
    """Presence is state, not in the log: the Watch stream carries it as Connect does."""
    watcher = Watcher(watched, await observer(watched), pb.WatchRequest(skip_history=True))
    while not watcher.roster_complete:
        await watcher.read_one()
    assert watcher.online == {"AI_Node_1"}
    second = await watched.connect("AI_Node_2")
    while "AI_Node_2" not in watcher.online:
        await watcher.read_one()
    second.call.cancel()
    while "AI_Node_2" in watcher.online:
        await watcher.read_one()
    assert watcher.online == {"AI_Node_1"}
    # A kinds filter without presence gets none of it.
    shares_only = Watcher(
        watched, await observer(watched), pb.WatchRequest(kinds=["artifact_shared"])
    )
    last = await share(watched, 1, "p")
    await shares_only.until_seq(last)
    assert not shares_only.online and not shares_only.roster_complete
    watcher.call.cancel()
    shares_only.call.cancel()


async def test_after_seq_and_skip_history(watched: HubHarness) -> None:
    middle = await share(watched, 4, "a")
    end = await share(watched, 4, "b")
    token = await observer(watched)
    resumed = Watcher(watched, token, pb.WatchRequest(after_seq=middle))
    await resumed.until_seq(end)
    assert [e.seq for e in resumed.events] == list(range(middle + 1, end + 1))
    fresh = Watcher(watched, token, pb.WatchRequest(skip_history=True))
    await fresh.read_one()
    assert fresh.head_seq == end
    while fresh.replay_complete is None:
        await fresh.read_one()
    live = await share(watched, 1, "c")
    await fresh.until_seq(live)
    assert [e.seq for e in fresh.events] == [live]
    resumed.call.cancel()
    fresh.call.cancel()


async def test_kinds_filter_and_a_bad_kind(watched: HubHarness) -> None:
    token = await observer(watched)
    shares = Watcher(watched, token, pb.WatchRequest(kinds=["artifact_shared"]))
    await watched.connect("AI_Node_2")  # an agent_joined the filter drops
    last = await share(watched, 3, "k")
    await shares.until_seq(last)
    assert {e.WhichOneof("body") for e in shares.events} == {"artifact_shared"}
    assert len(shares.events) == 3
    shares.call.cancel()

    bad = Watcher(watched, token, pb.WatchRequest(kinds=["artifact_shared", "<script>"]))
    error = await bad.status()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kinds[1]" in str(error.details())


async def test_a_slow_watcher_reads_the_log_and_hurts_nobody(watched: HubHarness) -> None:
    """The watcher's queue holds 8 events; it reads nothing while 120 components of 60 KiB
    are committed (7 MiB: more than the transport buffers, so its sender is stuck)."""
    # A fixed flow-control window (no BDP probing), so what the transport buffers is bounded.
    channel = grpc.aio.insecure_channel(
        target(watched.server), options=[("grpc.http2.bdp_probe", 0)]
    )
    slow = Watcher(
        watched, await observer(watched), pb.WatchRequest(skip_history=True), async_stub(channel)
    )
    await slow.read_one()
    while slow.replay_complete is None:
        await slow.read_one()
    raw = TRAINERS[watched]
    code = "int x;\n" * 7500
    ids = [
        await raw.send(
            share_code_component=pb.ShareCodeComponent(code_component=code_component(f"c{i}", code))
        )
        for i in range(120)
    ]
    # The trainer gets every receipt while the watcher does not read.
    last = max([(await raw.receipt(i)).seq for i in ids])
    fell_behind = [w.fell_behind for w in watched.server.router.watchers()]
    assert fell_behind and fell_behind[0] > 0, "the flood overflowed the watcher's queue"
    await slow.until_seq(last)
    seqs = [e.seq for e in slow.events]
    assert seqs == sorted(set(seqs)) and len(seqs) == 120
    slow.call.cancel()
    await channel.close(None)


async def test_a_watcher_is_not_an_agent(watched: HubHarness) -> None:
    # An observer token named like a live agent: watching must not supersede the agent.
    token = await watched.server.issue_token("AI_Node_1", role=Role.OBSERVER)
    watcher = Watcher(watched, token, pb.WatchRequest(skip_history=True))
    await watcher.read_one()
    stats = await watched.query("GetHubStats", pb.GetHubStatsRequest())
    assert (stats.agents_online, stats.watch_streams) == (1, 1)
    agents = await watched.query("ListAgents", pb.ListAgentsRequest())
    assert [a.agent_id for a in agents.agents] == ["AI_Node_1"]
    # The agent's stream lives on and is watched.
    last = await share(watched, 1, "still")
    await watcher.until_seq(last)
    watcher.call.cancel()
    await _until(lambda: watched.server.router.watch_count == 0)


@pytest.mark.parametrize("role", [Role.AGENT, Role.VALIDATOR])
async def test_watch_is_refused_to_roles_that_do_not_observe(
    harness: HubHarness, role: Role
) -> None:
    watcher = Watcher(harness, await harness.token(f"{role.value}_w", role=role), pb.WatchRequest())
    error = await watcher.status()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"role {role.value!r}" in str(error.details()) and "Watch" in str(error.details())


async def test_admin_may_watch_and_a_revoked_token_ends_the_watch(watched: HubHarness) -> None:
    token = await observer(watched, "ops", Role.ADMIN)
    watcher = Watcher(watched, token, pb.WatchRequest())
    await watcher.read_one()
    await watched.server.store.revoke_tokens("ops")
    error = await watcher.status()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_watch_streams_are_limited(hub_config: HubConfig) -> None:
    async with TestHub.in_process(replace(hub_config, max_watch_streams=1)) as test_hub:
        harness = HubHarness(test_hub.server)
        try:
            token = await observer(harness)
            first = Watcher(harness, token, pb.WatchRequest())
            await first.read_one()
            error = await Watcher(harness, token, pb.WatchRequest()).status()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 1 Watch" in str(error.details())
            first.call.cancel()
        finally:
            await harness.close()


async def test_a_stopping_hub_ends_the_watch_unavailable(hub_config: HubConfig) -> None:
    async with TestHub.in_process(hub_config) as test_hub:
        server: HubServer = test_hub.server
        harness = HubHarness(server)
        try:
            watcher = Watcher(harness, await observer(harness), pb.WatchRequest())
            await watcher.read_one()
            stopping = asyncio.create_task(server.stop())
            error = await watcher.status()
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            await stopping
        finally:
            await harness.close()


async def _until(condition: object) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110  (router state: no event to wait on)
            await asyncio.sleep(0.01)

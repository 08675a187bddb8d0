"""HubClient against a real hub: typed sends and errors, events, and reconnection that resumes
by seq, resends unacknowledged messages with their original ids and never duplicates."""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc
from hub_service.server import HubServer
from hub_service.validation import Limits
from trainer_service.sdk.client import HubClient
from trainer_service.sdk.errors import (
    ConnectionLost,
    InvalidArgument,
    NotFound,
    Superseded,
    Unauthenticated,
)

from .conftest import WAIT, HubHarness, free_port, make_config, pattern, target


def client(hub_target: str, agent_id: str, token: str, **kw: object) -> HubClient:
    return HubClient(
        hub_target,
        agent_id,
        token,
        specialization=pb.SPECIALIZATION_NETWORKING,
        capabilities=["network_protocols"],
        **kw,  # type: ignore[arg-type]
    )


async def next_event(events: AsyncIterator[object], kind: str) -> pb.HubEvent:
    async with asyncio.timeout(WAIT):
        async for item in events:
            if isinstance(item, pb.HubEvent) and item.WhichOneof("body") == kind:
                return item
    raise AssertionError(f"the stream ended before a {kind} event")


async def test_typed_sends_events_and_errors(hub: HubServer, harness: HubHarness) -> None:
    async with (
        client(target(hub), "AI_Node_1", await harness.token("AI_Node_1")) as alice,
        client(target(hub), "AI_Node_2", await harness.token("AI_Node_2")) as bob,
    ):
        receipt = await alice.share_pattern(pattern("typed"))
        assert receipt.seq > 0 and receipt.resource_id.startswith("art_")
        shared = await next_event(bob.events(), "artifact_shared")
        assert shared.artifact_shared.artifact_id == receipt.resource_id
        assert bob.last_processed_seq == shared.seq

        with pytest.raises(InvalidArgument) as bad:
            await alice.share_pattern(pattern("bad", confidence=2.0))
        assert ("share_pattern.pattern.confidence", "must be between 0.0 and 1.0, got 2.0") in [
            tuple(v) for v in bad.value.field_violations
        ]
        with pytest.raises(NotFound, match="collaboration collab_nope not found"):
            await alice.accept_collaboration("collab_nope")
        assert (await alice.get_artifact(receipt.resource_id)).pattern.pattern_id == "typed"
        assert (await alice.stats()).knowledge_base.pattern_count == 1


async def test_bad_token_and_supersession_are_typed(hub: HubServer, harness: HubHarness) -> None:
    with pytest.raises(Unauthenticated):
        async with client(target(hub), "AI_Node_1", "kh_wrong"):
            pass
    token = await harness.token("AI_Node_1")
    # Entered in order: the second connection for the same agent supersedes the first.
    async with (
        client(target(hub), "AI_Node_1", token) as first,
        client(target(hub), "AI_Node_1", token),
    ):
        with pytest.raises(Superseded):
            async with asyncio.timeout(WAIT):
                async for _ in first.events():
                    pass


async def test_reconnects_resends_and_resumes_across_a_hub_restart(tmp_path: Path) -> None:
    port = free_port()
    config = make_config(f"sqlite:///{tmp_path / 'hub.db'}", port=port, shutdown_grace=1.0)
    hub = HubServer(config)
    await hub.start()
    tokens = {a: await hub.issue_token(a) for a in ("AI_Node_1", "AI_Node_2")}
    address = f"127.0.0.1:{port}"
    async with (
        client(address, "AI_Node_1", tokens["AI_Node_1"], backoff_base=0.05) as writer,
        client(address, "AI_Node_2", tokens["AI_Node_2"], backoff_base=0.05) as reader,
    ):
        first = await writer.share_pattern(pattern("before"))
        await hub.stop()  # the hub goes away under both clients

        # Sends made while it is down wait, then go through once it is back (same ids).
        pending = [
            asyncio.create_task(writer.share_pattern(pattern(f"during{i}"))) for i in range(5)
        ]
        hub = HubServer(config)
        await hub.start()
        receipts = await asyncio.wait_for(asyncio.gather(*pending), WAIT * 3)
        after = await writer.share_pattern(pattern("after"))
        assert writer.reconnects >= 1
        assert len({r.resource_id for r in receipts}) == 5

        seen: list[pb.HubEvent] = []
        async with asyncio.timeout(WAIT * 3):
            async for item in reader.events():
                if isinstance(item, pb.HubEvent):
                    seen.append(item)
                    if item.seq >= after.seq:
                        break
        seqs = [e.seq for e in seen]
        assert seqs == sorted(set(seqs)), "exactly once, in seq order"
        names = [
            e.artifact_shared.pattern.pattern_id for e in seen if e.HasField("artifact_shared")
        ]
        assert names == ["before", *(f"during{i}" for i in range(5)), "after"]
        assert first.seq < min(r.seq for r in receipts)

    listed = await HubHarness(hub).query("ListArtifacts", pb.ListArtifactsRequest(page_size=100))
    assert len(listed.artifacts) == 7, "resent messages are stored once"
    await hub.stop()


async def test_gives_up_with_connection_lost(tmp_path: Path) -> None:
    port = free_port()
    hub = HubServer(make_config(f"sqlite:///{tmp_path / 'hub.db'}", port=port, shutdown_grace=1.0))
    await hub.start()
    token = await hub.issue_token("AI_Node_1")
    async with client(
        f"127.0.0.1:{port}", "AI_Node_1", token, reconnect_timeout=1.0, backoff_base=0.05
    ) as lonely:
        await hub.stop()
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(lonely.share_pattern(pattern("never")), WAIT)


async def test_sends_waiting_together_share_stream_messages(
    hub: HubServer, harness: HubHarness
) -> None:
    """Fifty concurrent shares: each gets its own receipt and is stored once, and they
    travel in fewer stream messages than shares (RequestBatch)."""
    async with client(target(hub), "AI_Node_1", await harness.token("AI_Node_1")) as alice:
        before = alice.stream_messages_written
        receipts = await asyncio.gather(*(alice.share_pattern(pattern(f"b{i}")) for i in range(50)))
        assert len({r.seq for r in receipts}) == 50 and not any(r.duplicate for r in receipts)
        written = alice.stream_messages_written - before
        assert 1 <= written < 50, f"{written} stream messages for 50 concurrent shares"
        with pytest.raises(ValueError, match="batches"):
            await alice.send(pb.ConnectRequest(message_id="x", batch=pb.RequestBatch()))
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest(page_size=100))
    assert sorted(a.pattern.pattern_id for a in listed.artifacts) == sorted(
        f"b{i}" for i in range(50)
    )


async def test_a_batch_refused_whole_fails_each_of_its_sends_at_once(tmp_path: Path) -> None:
    """A hub whose id limit is below the length of the client's batch ids (38) refuses
    every batch as a whole, by the batch's id: each send in it gets that error at once
    instead of waiting out its send timeout."""
    config = make_config(f"sqlite:///{tmp_path / 'hub.db'}", limits=Limits(max_id_length=37))
    hub = HubServer(config)
    await hub.start()
    try:
        token = await hub.issue_token("AI_Node_1")
        async with client(target(hub), "AI_Node_1", token, send_timeout=WAIT * 10) as alice:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(alice.share_pattern(pattern(f"r{i}")) for i in range(3)),
                    return_exceptions=True,
                ),
                WAIT,
            )
            assert all(isinstance(r, InvalidArgument) for r in results), results
            assert len({r.message_id for r in results if isinstance(r, InvalidArgument)}) == 3
            assert all("message_id" in str(r) for r in results), results
    finally:
        await hub.stop()


async def test_the_sdk_loads_without_the_simulation_or_the_hub() -> None:
    """`from trainer_service import HubClient` is all a user's agent needs, and all it loads."""
    probe = (
        "import sys; from trainer_service import HubClient, HubError; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('hub_service', 'trainer_service', 'rich')))"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), WAIT * 6)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == str(
        [
            "trainer_service",
            "trainer_service.sdk",
            "trainer_service.sdk.client",
            "trainer_service.sdk.errors",
            "trainer_service.sdk.targets",
        ]
    )


class _DroppingHub(hub_pb2_grpc.HubServiceServicer):
    """A replica that welcomes every stream and drops it at once."""

    def __init__(self, streams: int) -> None:
        self.streams = 0
        self.enough = asyncio.Event()  # set at the stream number `streams`
        self._wanted = streams

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ConnectResponse]:
        await anext(aiter(request_iterator))  # the Hello
        self.streams += 1
        if self.streams >= self._wanted:
            self.enough.set()
        yield pb.ConnectResponse(welcome=pb.Welcome(hub_version="dropping", roster_size=0))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this replica drops every stream")


class _Ceilings(random.Random):
    """Records the ceiling of every jittered reconnect pause."""

    def __init__(self) -> None:
        super().__init__(1)
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return super().uniform(a, b)


async def test_streams_lost_right_after_their_welcome_back_off() -> None:
    dropping = _DroppingHub(streams=5)  # type: ignore[abstract]  # it serves Connect only
    server = grpc.aio.server()
    hub_pb2_grpc.add_HubServiceServicer_to_server(dropping, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rng = _Ceilings()
    try:
        async with client(f"127.0.0.1:{port}", "AI_Node_1", "token", backoff_base=0.01, rng=rng):
            await asyncio.wait_for(dropping.enough.wait(), WAIT)
    finally:
        await server.stop(None)
    # Each Welcome did not reset the backoff: each pause may be twice the one before.
    assert rng.ceilings[:4] == [0.01, 0.02, 0.04, 0.08], rng.ceilings

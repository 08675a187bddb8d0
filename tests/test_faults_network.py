"""The network between a trainer and the hub freezes or drops (a TCP proxy on loopback that the
test controls): keepalive notices, the trainer reconnects and resumes, nothing is lost; a query
caught by a short outage is retried by the client's channel."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer
from trainer_service.sdk.client import HubClient
from trainer_service.sdk.errors import InvalidArgument

from .conftest import WAIT, HubHarness, make_config, pattern

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_HEADERS = 0x1


class _H2StreamCounter:
    """Counts the HTTP/2 streams a client opens (one per RPC attempt, retries included) from
    the bytes it sends: a gRPC client sends exactly one HEADERS frame per stream."""

    def __init__(self) -> None:
        self.opened = 0
        self._buffer = bytearray()
        self._preface = True

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._preface:
            if len(self._buffer) < len(_H2_PREFACE):
                return
            del self._buffer[: len(_H2_PREFACE)]
            self._preface = False
        while len(self._buffer) >= 9:
            size = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + size:
                return
            if self._buffer[3] == _H2_HEADERS:
                self.opened += 1
            del self._buffer[: 9 + size]


class Proxy:
    """Forwards TCP to the hub until told to freeze (hold every byte, answer nothing) or drop;
    `refuse` connections are reset at once (the hub is down)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections = 0
        self.refuse = 0
        self.refused = 0
        self._counters: list[_H2StreamCounter] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def client_streams(self) -> int:
        """HTTP/2 streams clients opened through the proxy so far."""
        return sum(counter.opened for counter in self._counters)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()  # a frozen network does not even connect
        if self.refuse > 0:
            self.refuse -= 1
            self.refused += 1
            writer.transport.abort()
            return
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {writer, up_writer}
        counter = _H2StreamCounter()
        self._counters.append(counter)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, counter)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        counter: _H2StreamCounter | None = None,
    ) -> None:
        while chunk := await source.read(65536):
            if counter is not None:
                counter.feed(chunk)
            await self.flowing.wait()
            sink.write(chunk)
            await sink.drain()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def drop(self) -> None:
        """Cut every proxied connection (like a NAT forgetting them)."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        self.thaw()
        self.drop()
        if self._server is not None:
            self._server.close()


@pytest.fixture
def hub_config(database_url: str) -> HubConfig:
    # Keepalive tight enough for a test: pings every 0.5 s are fine, dead peers noticed in ~2 s.
    return make_config(
        database_url, keepalive_time=1.0, keepalive_timeout=1.0, min_client_ping_interval=0.2
    )


@pytest.mark.parametrize("fault", ["freeze", "drop"])
async def test_trainer_survives_a_frozen_or_dropped_network(
    hub: HubServer, harness: HubHarness, fault: str
) -> None:
    proxy = Proxy(hub.port)
    port = await proxy.start()
    writer = await harness.connect("AI_Node_2")
    reader = HubClient(
        f"127.0.0.1:{port}",
        "AI_Node_1",
        await harness.token("AI_Node_1"),
        specialization=pb.SPECIALIZATION_NETWORKING,
        keepalive_seconds=0.5,
        keepalive_timeout_seconds=1.0,
        backoff_base=0.05,
        backoff_cap=0.5,
    )
    received: list[pb.HubEvent] = []

    async def consume(until_seq: int) -> None:
        async for item in reader.events():
            if isinstance(item, pb.HubEvent):
                received.append(item)
                if item.seq >= until_seq:
                    return

    try:
        await reader.start()
        before = await writer.receipt(
            await writer.send(share_pattern=pb.SharePattern(pattern=pattern("before")))
        )
        await asyncio.wait_for(consume(before.seq), WAIT)

        getattr(proxy, fault)()
        own = asyncio.create_task(reader.share_pattern(pattern("sent-during-the-fault")))
        during = [
            await writer.receipt(
                await writer.send(share_pattern=pb.SharePattern(pattern=pattern(f"during{i}")))
            )
            for i in range(20)
        ]
        if fault == "freeze":
            # Keepalive must notice the silent connection: the hub drops the agent.
            await writer.left("AI_Node_1")
            proxy.thaw()
        own_receipt = await asyncio.wait_for(own, WAIT * 3)
        await asyncio.wait_for(consume(during[-1].seq), WAIT * 3)

        assert reader.reconnects >= 1 and proxy.connections >= 2
        seqs = [e.seq for e in received]
        assert seqs == sorted(set(seqs)), "exactly once, in order"
        names = [
            e.artifact_shared.pattern.pattern_id for e in received if e.HasField("artifact_shared")
        ]
        assert names == ["before", *(f"during{i}" for i in range(20))]
        stored = await harness.query(
            "ListArtifacts", pb.ListArtifactsRequest(contributor_id="AI_Node_1")
        )
        assert [a.artifact_id for a in stored.artifacts] == [own_receipt.resource_id]  # once
    finally:
        with contextlib.suppress(Exception):
            await reader.close()
        await proxy.close()


async def test_a_query_is_retried_across_a_short_outage(
    hub: HubServer, harness: HubHarness
) -> None:
    """The first connection is reset, as by a hub that is not up yet: the query's UNAVAILABLE
    is retried by the channel's retry policy, on a new connection, and answered."""
    proxy = Proxy(hub.port)
    port = await proxy.start()
    proxy.refuse = 1
    token = await harness.token("observer")
    try:
        async with HubClient(
            f"127.0.0.1:{port}", "observer", token, stream=False, backoff_base=0.05
        ) as client:
            stats = await client.stats()
        assert stats.hub_version, "answered by the hub"
        assert proxy.refused == 1 and proxy.connections == 1
    finally:
        await proxy.close()


async def test_a_refused_query_is_not_retried(hub: HubServer, harness: HubHarness) -> None:
    """Only UNAVAILABLE is retried: an INVALID_ARGUMENT is answered after one attempt."""
    proxy = Proxy(hub.port)
    port = await proxy.start()
    token = await harness.token("observer")
    try:
        async with HubClient(f"127.0.0.1:{port}", "observer", token, stream=False) as client:
            await client.stats()  # connected: what follows opens streams only for the query
            before = proxy.client_streams
            with pytest.raises(InvalidArgument, match="page_size"):
                await client.list_artifacts(page_size=-1)
            assert proxy.client_streams - before == 1
    finally:
        await proxy.close()

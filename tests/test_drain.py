"""A graceful stop under load: every stream the hub ends gets the status the README promises
(UNAVAILABLE, never OK: OK means the client half-closed), whatever the other streams do, and
everything that got a receipt is stored."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.sql_store import SqlStore

from .conftest import WAIT, HubProcess, async_stub, auth, hello, pattern

ACTIVE = [f"AI_Node_{i}" for i in range(1, 7)]
STALLED = "AI_Node_7"
GRACE = 12.0  # the hub's shutdown grace in this test, seconds


class Sharer:
    """Shares every few milliseconds, reads everything, never half-closes.

    A blocking grpc client in threads: grpc.aio overwrites the status of a call whose write
    fails as the hub ends it with a local INTERNAL (the README's client rules), which would
    hide the status the hub sent."""

    def __init__(self, agent_id: str, target: str, token: str) -> None:
        self.agent_id = agent_id
        self.channel = grpc.insecure_channel(target)
        self.receipts: dict[str, pb.Receipt] = {}
        self.errors: list[pb.RequestError] = []
        self.stop = threading.Event()
        self.ended = 0.0  # time.monotonic() when the stream ended
        self.call = self.channel.stream_stream(
            "/kernelhub.v1.HubService/Connect",
            request_serializer=pb.ConnectRequest.SerializeToString,
            response_deserializer=pb.ConnectResponse.FromString,
        )(self._requests(), metadata=auth(token))

    def _requests(self) -> Iterator[pb.ConnectRequest]:
        yield pb.ConnectRequest(message_id="hello", hello=hello(self.agent_id))
        i = 0
        while not self.stop.wait(0.003):
            yield _share(self.agent_id, i)
            i += 1
        self.stop.wait()  # never half-close: the hub ends the call

    def read(self) -> grpc.StatusCode:
        """Read until the stream ends; its status."""
        with contextlib.suppress(grpc.RpcError):
            for response in self.call:
                for receipt in response.receipts:
                    self.receipts[receipt.message_id] = receipt
                self.errors += response.errors
        self.ended = time.monotonic()
        code: grpc.StatusCode = self.call.code()
        return code

    def close(self) -> None:
        self.stop.set()
        self.call.cancel()
        self.channel.close()


def _share(agent_id: str, i: int) -> pb.ConnectRequest:
    """A share of ~4 KB, so the stalled reader's flow-control windows fill fast."""
    shared = pattern(f"{agent_id}-{i}")
    shared.attributes.update({f"note{n}": "n" * 1000 for n in range(4)})
    return pb.ConnectRequest(
        message_id=f"{agent_id}-{i}", share_pattern=pb.SharePattern(pattern=shared)
    )


class Stalled:
    """Says Hello and shares, but never reads: once its window is full of the others'
    events, the hub's writes to it block, its receipts wait, and its in-flight window fills,
    so the hub stops reading it and its writes block too."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.last_write = asyncio.get_running_loop().time()

    async def share(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):  # until the call ends
            await self.call.write(pb.ConnectRequest(message_id="hello", hello=hello(STALLED)))
            for i in itertools.count():
                await self.call.write(_share(STALLED, i))
                self.last_write = loop.time()
                await asyncio.sleep(0.003)

    def blocked(self) -> bool:
        return asyncio.get_running_loop().time() - self.last_write > 1.0


async def test_sigterm_ends_busy_streams_unavailable_beside_a_stalled_reader(
    tmp_path: Path,
) -> None:
    # A long grace: the stalled stream holds its own end for all of it, the others must not.
    hub = HubProcess(tmp_path / "hub.db", KERNELHUB_SHUTDOWN_GRACE=str(GRACE))
    tokens = await hub.issue_tokens(*ACTIVE, STALLED)
    await hub.start()
    # Its own connection: it says Hello, shares, and never reads, so its flow-control window
    # fills with the others' events, the hub's writes to it block, and its receipts wait.
    channel = grpc.aio.insecure_channel(hub.target)
    sharers = [Sharer(agent_id, hub.target, tokens[agent_id]) for agent_id in ACTIVE]
    call = async_stub(channel).Connect(metadata=auth(tokens[STALLED]))
    stalled = Stalled(call)
    stalled_writer = asyncio.create_task(stalled.share())
    try:
        readers = [asyncio.create_task(asyncio.to_thread(s.read)) for s in sharers]
        # Until the hub has stopped reading the stalled stream (its receipts cannot go out)
        # while the others go on sharing.
        async with asyncio.timeout(WAIT * 6):
            while not (stalled.blocked() and all(len(s.receipts) > 50 for s in sharers)):
                assert not any(s.errors for s in sharers), [s.errors[:1] for s in sharers]
                await asyncio.sleep(0.05)
        assert hub.process is not None
        stopping = time.monotonic()
        hub.process.terminate()
        codes = await asyncio.wait_for(asyncio.gather(*readers), WAIT * 3)
        assert codes == [grpc.StatusCode.UNAVAILABLE] * len(sharers), codes
        assert await asyncio.wait_for(hub.process.wait(), GRACE + WAIT * 3) == 0
        exited = time.monotonic()
        # The hub exits only once the stalled stream's grace is over; the busy streams were
        # ended long before that, not held up by it (a ratio, not a duration).
        busy = max(s.ended for s in sharers) - stopping
        assert busy < (exited - stopping) / 2, (busy, exited - stopping)
    finally:
        call.cancel()
        stalled_writer.cancel()
        for sharer in sharers:
            sharer.close()
        await channel.close(None)
        await hub.close()

    store = SqlStore(f"sqlite:///{tmp_path / 'hub.db'}", writer="thread")
    await store.open()
    try:
        stored: set[str] = set()
        cursor = ""
        while True:
            page = await store.list_artifacts(0, 0, "", 500, cursor)
            stored |= {a.artifact_id for a in page.items}
            if not (cursor := page.next_cursor):
                break
    finally:
        await store.close()
    receipted = {r.resource_id for s in sharers for r in s.receipts.values()}
    assert receipted <= stored, f"{len(receipted - stored)} messages had a receipt but are lost"

"""A consumer stops reading while trainers share at full speed: the hub's memory stays
bounded (it does not buffer the backlog), and the consumer later receives everything, in order.

What is measured is the promise, not the allocator: the hub's RSS growth after its working
set has levelled off, for a backlog some fourteen times the stalled connection's bound (1,024
live events). Bounded, the growth is a few MiB at most; holding the backlog, it is more than
the backlog.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import psutil
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb

from .conftest import WAIT, HubProcess, RawTrainer, async_stub, auth, code_component, hello

MiB = 2**20
# Few writers, so that their own bounded queues (1,024 events each, and every share reaches
# every writer too) are small beside the stalled reader's backlog, and the fan-out is cheap
# enough for a large backlog in the time fifty writers took for a small one.
WRITERS = 5
IN_FLIGHT = 50  # messages each writer sends before it waits for their receipts
WARM_UP_EACH = 500  # shares per writer per warm-up round: ~2.5x the stalled reader's live queue
MAX_WARM_UP_ROUNDS = 5
PLATEAU = 2 * MiB  # a warm-up round that lifts the peak RSS less than this ends the warm-up
MEASURED_EACH = 3000  # shares per writer after the warm-up: a backlog of ~54 MiB
CODE = "/* a component of a realistic size */\n" * 100  # ~4 KiB per event
# glibc gives each thread that allocates an arena of its own, up to 8 per core, and keeps the
# memory freed in them: RSS then wanders by tens of MiB with no object alive (issue 10). Two
# arenas (MALLOC_ARENA_MAX) leave it little to keep, and change nothing about what a held
# backlog costs.
ARENAS = "2"


async def open_trainer(stub: object, agent: str, token: str) -> RawTrainer:
    call = stub.Connect(metadata=auth(token))  # type: ignore[attr-defined]
    await call.write(pb.ConnectRequest(message_id="hello", hello=hello(agent)))
    return await RawTrainer.welcomed(agent, call)


async def share(writer: RawTrainer, first: int, count: int) -> pb.Receipt:
    """Shares `count` components, IN_FLIGHT at a time; the receipt of the last one."""
    last = ""
    for start in range(first, first + count, IN_FLIGHT):
        mids = [
            await writer.send(
                share_code_component=pb.ShareCodeComponent(
                    code_component=code_component(
                        f"{writer.agent_id}-{i}", CODE + f"int f_{i}(void) {{ return {i}; }}\n"
                    )
                )
            )
            for i in range(start, min(start + IN_FLIGHT, first + count))
        ]
        for mid in mids:
            await writer.receipt(mid)
        last = mids[-1]
        writer.events.clear()  # the writers keep up; only "stalled" stops reading
    return writer.receipts[last]


async def test_stalled_reader_costs_bounded_memory(tmp_path: Path) -> None:
    agents = ["stalled", *(f"writer{i}" for i in range(WRITERS))]
    hub = HubProcess(
        tmp_path / "hub.db", KERNELHUB_RATE_LIMIT_PER_SECOND="0", MALLOC_ARENA_MAX=ARENAS
    )
    tokens = await hub.issue_tokens(*agents)
    await hub.start()
    assert hub.process is not None
    process = psutil.Process(hub.process.pid)
    channel = grpc.aio.insecure_channel(hub.target, options=[("grpc.http2.bdp_probe", 0)])
    sampler: asyncio.Task[None] | None = None
    try:
        stub = async_stub(channel)
        stalled = await open_trainer(stub, "stalled", tokens["stalled"])
        writers = [await open_trainer(stub, a, tokens[a]) for a in agents[1:]]
        peak = process.memory_info().rss

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.05)  # a sampling period, not a wait for anything

        async def share_all(first: int, each: int) -> list[pb.Receipt]:
            return await asyncio.wait_for(
                asyncio.gather(*(share(w, first, each) for w in writers)), WAIT * 30
            )

        sampler = asyncio.create_task(sample())
        # Warm-up: the live readers' working set, the stalled reader's full queue, the
        # commit pipeline and gRPC's buffers all reach their size, and the peak stops rising.
        # A hub that held the backlog never gets here.
        rises: list[float] = []
        while True:
            before = peak
            await share_all(len(rises) * WARM_UP_EACH, WARM_UP_EACH)
            rises.append((peak - before) / MiB)
            if peak - before < PLATEAU:
                break
            if len(rises) == MAX_WARM_UP_ROUNDS:
                pytest.fail(
                    f"the hub's RSS rose by {', '.join(f'{r:.1f}' for r in rises)} MiB in "
                    f"{len(rises)} warm-up rounds of {WRITERS * WARM_UP_EACH} shares each and "
                    "never levelled off: it holds the stalled consumer's backlog"
                )
        steady = peak

        finals = await share_all(len(rises) * WARM_UP_EACH, MEASURED_EACH)
        sampler.cancel()
        backlog = WRITERS * MEASURED_EACH * len(CODE)
        growth = peak - steady
        print(
            f"warm-up rises {rises} MiB; then a backlog of {backlog / MiB:.0f} MiB grew the "
            f"hub's peak RSS by {growth / MiB:.1f} MiB"
        )
        # Seen with a 54 MiB backlog: 0-2 MiB bounded; 74 MiB, growing with the backlog, when
        # the live queue is unbounded. A fifth of the backlog is far from both.
        assert growth < backlog / 5, (
            f"the hub's RSS grew {growth / MiB:.1f} MiB while a stalled consumer's backlog "
            f"grew {backlog / MiB:.0f} MiB: it must not hold that backlog"
        )

        # Reading again, it gets every share, once each, in order.
        last_seq = max(r.seq for r in finals)
        await asyncio.wait_for(stalled.until_seq(last_seq), WAIT * 12)
        seqs = [e.seq for e in stalled.events]
        assert seqs == sorted(set(seqs))
        shared = [e for e in stalled.events if e.HasField("artifact_shared")]
        assert len(shared) == WRITERS * (len(rises) * WARM_UP_EACH + MEASURED_EACH)
    finally:
        if sampler is not None:
            sampler.cancel()
        await channel.close(None)
        await hub.close()

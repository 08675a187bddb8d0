"""Processes die: the hub is SIGKILLed or SIGTERMed under a swarm and restarted on the same
database; a trainer is SIGKILLed in the middle of a collaboration."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.sql_store import SqlStore
from trainer_service.sdk.client import HubClient

from .conftest import WAIT, HubHarness, HubProcess, hello, make_config, pattern, short_policy

AGENTS = [f"AI_Node_{i}" for i in range(1, 6)]
SHARES_EACH = 60


class Member:
    """One trainer of the swarm: shares steadily and records everything it is sent."""

    def __init__(self, agent_id: str, hub: HubProcess, token: str) -> None:
        self.agent_id = agent_id
        self.client = HubClient(
            hub.target,
            agent_id,
            token,
            specialization=pb.SPECIALIZATION_NETWORKING,
            skip_history=False,  # from the beginning: checked below against all it is entitled to
            backoff_base=0.05,
            backoff_cap=0.5,
            reconnect_timeout=60,
        )
        self.receipts: list[pb.Receipt] = []
        self.events: list[pb.HubEvent] = []

    async def share(self, progress: asyncio.Event, total: list[int]) -> None:
        for start in range(0, SHARES_EACH, 5):  # five in flight at a time
            batch = [
                self.client.share_pattern(pattern(f"{self.agent_id}-{i}"))
                for i in range(start, start + 5)
            ]
            self.receipts += await asyncio.gather(*batch)
            total[0] += len(batch)
            progress.set()

    async def read_until(self, artifacts_expected: int) -> None:
        got = 0
        async for item in self.client.events():
            if isinstance(item, pb.HubEvent):
                self.events.append(item)
                got += item.HasField("artifact_shared")
                if got >= artifacts_expected:
                    return


async def _swarm_across_a_hub_failure(tmp_path: Path, graceful: bool) -> None:
    hub = HubProcess(tmp_path / "hub.db")
    tokens = await hub.issue_tokens(*AGENTS)
    await hub.start()
    members = [Member(a, hub, tokens[a]) for a in AGENTS]
    try:
        for member in members:
            await member.client.start()
        progress, total = asyncio.Event(), [0]
        readers = [
            asyncio.create_task(m.read_until(SHARES_EACH * (len(AGENTS) - 1))) for m in members
        ]
        senders = [asyncio.create_task(m.share(progress, total)) for m in members]
        while total[0] < SHARES_EACH * len(AGENTS) // 3:  # a third of the way through
            progress.clear()
            await asyncio.wait_for(progress.wait(), WAIT)
        assert hub.process is not None
        helpers = psutil.Process(hub.process.pid).children(recursive=True)
        forked = [p for p in helpers if "multiprocessing.forkserver" in " ".join(p.cmdline())]
        assert len(forked) == 2, "the fork server and the writer process it forked"
        if graceful:
            assert await hub.terminate() == 0
        else:
            await hub.kill()
        _, left = await asyncio.to_thread(psutil.wait_procs, helpers, WAIT)
        assert not left, f"outlived the hub: {left}"
        await hub.start()
        await asyncio.wait_for(asyncio.gather(*senders), WAIT * 6)
        await asyncio.wait_for(asyncio.gather(*readers), WAIT * 6)
        assert all(m.client.reconnects >= 1 for m in members), "every trainer reconnected by itself"
        # The five shares in flight at a time travel as batches (and are resent as batches).
        assert all(m.client.stream_messages_written < SHARES_EACH for m in members)
    finally:
        for member in members:
            await member.client.close()
        await hub.close()

    store = SqlStore(f"sqlite:///{tmp_path / 'hub.db'}", writer="thread")
    await store.open()
    try:
        # Every receipted message is stored, exactly once.
        stored = []
        cursor = ""
        while True:
            page = await store.list_artifacts(0, 0, "", 500, cursor)
            stored += [a.artifact_id for a in page.items]
            cursor = page.next_cursor
            if not cursor:
                break
        receipted = {r.resource_id for m in members for r in m.receipts}
        assert len(stored) == len(set(stored)) == SHARES_EACH * len(AGENTS)
        assert receipted == set(stored)
        # Each trainer got exactly the events it is entitled to, once each, in seq order.
        for member in members:
            seqs = [e.seq for e in member.events]
            assert seqs == sorted(set(seqs)), f"{member.agent_id}: duplicates or disorder"
            entitled = await store.events_for(member.agent_id, 0, 100_000)
            assert seqs == [e.seq for e in entitled][: len(seqs)], f"{member.agent_id}: a gap"
        assert await store.integrity_check() == "ok"
    finally:
        await store.close()


async def test_hub_sigkilled_mid_swarm_loses_nothing_acknowledged(tmp_path: Path) -> None:
    await _swarm_across_a_hub_failure(tmp_path, graceful=False)


async def test_hub_sigtermed_under_load_drains_and_trainers_come_back(tmp_path: Path) -> None:
    await _swarm_across_a_hub_failure(tmp_path, graceful=True)


WORKER = """
import asyncio, sys
from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.sdk.client import HubClient

async def main(target, token):
    async with HubClient(target, "AI_Node_2", token, specialization=pb.SPECIALIZATION_SECURITY) as hub:
        print("ready", flush=True)
        async for item in hub.events():
            if isinstance(item, pb.HubEvent) and item.HasField("collaboration_updated"):
                session = item.collaboration_updated.collaboration.session_id
                await hub.accept_collaboration(session)
                await hub.report_progress(session, 0.3, "halfway through the handshake")
                print("working", flush=True)
                await asyncio.sleep(3600)  # killed long before this ends

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
def hub_config(database_url: str) -> HubConfig:
    return make_config(
        database_url,
        reaper_interval=0.2,
        policy=short_policy(partner_offline_grace=timedelta(seconds=1)),
    )


async def test_trainer_sigkilled_mid_collaboration_expires_it(harness: HubHarness) -> None:
    initiator = await harness.connect("AI_Node_1", hello("AI_Node_1", pb.SPECIALIZATION_NETWORKING))
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        f"127.0.0.1:{harness.server.port}",
        await harness.token("AI_Node_2"),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert worker.stdout is not None
        assert await asyncio.wait_for(worker.stdout.readline(), WAIT * 3) == b"ready\n"
        mid = await initiator.send(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id="AI_Node_2", type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION
            )
        )
        session = (await initiator.receipt(mid)).resource_id
        assert await asyncio.wait_for(worker.stdout.readline(), WAIT * 3) == b"working\n"
        await initiator.event(
            "collaboration_updated",
            collaboration__session_id=session,
            collaboration__state=pb.COLLABORATION_STATE_ACTIVE,
        )
        worker.kill()
        await worker.wait()
        await initiator.left("AI_Node_2")
        expired = await initiator.event(
            "collaboration_updated",
            collaboration__session_id=session,
            collaboration__state=pb.COLLABORATION_STATE_EXPIRED,
        )
        assert (
            expired.collaboration_updated.collaboration.end_reason
            == "partner AI_Node_2 went offline"
        )
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()

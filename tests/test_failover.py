"""Clients on several hub replicas: HubClient, the swarm and the Node example spread over the
replicas gRPC is given (its ipv4: resolver and pick_first policy, shuffled) and, when one dies,
fail over to the others and resume by seq. Each test starts its replicas as processes on a
fresh PostgreSQL database (the fixtures of test_replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import psutil
import psycopg
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.testing import TestHub
from trainer_service.sdk.client import HubClient
from trainer_service.sdk.targets import parse_hub_target
from trainer_service.simulation import trainer as trainer_module
from trainer_service.simulation.swarm import embedded_hub, run_swarm

from .conftest import WAIT, pattern
from .test_node_trainer import NODE, node_trainer
from .test_replicas import _conninfo, log_seqs, replica_url, replicas

pytestmark = pytest.mark.timeout(180)

__all__ = ["replica_url"]  # the fixture, used by name


def spread(hubs: Sequence[TestHub]) -> list[int]:
    """This process's established connections to each replica: with a channel's own
    subchannels, one per client, on the replica it picked."""
    ports = [hub.port for hub in hubs]
    counts = Counter(
        c.raddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports
    )
    return [counts[port] for port in ports]


async def settled_spread(hubs: Sequence[TestHub], clients: int) -> list[int]:
    """The spread once every client holds exactly one connection (within WAIT)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while sum(counts := spread(hubs)) != clients:
        if loop.time() > deadline:
            raise AssertionError(f"{clients} clients, connections per replica {counts}")
        await asyncio.sleep(0.05)
    return counts


async def entitled(conninfo: str, agent_id: str, after: int, upto: int) -> list[int]:
    """The seqs of the log `agent_id` receives (no subscription) in (after, upto]: broadcasts
    by others and what is addressed to it."""
    async with await psycopg.AsyncConnection.connect(conninfo) as db:
        rows = await (
            await db.execute(
                "SELECT e.seq FROM event e WHERE e.seq > %s AND e.seq <= %s AND ("
                "(e.broadcast AND e.sender_id <> %s) OR EXISTS (SELECT 1 FROM event_recipient r "
                "WHERE r.seq = e.seq AND r.agent_id = %s)) ORDER BY e.seq",
                (after, upto, agent_id, agent_id),
            )
        ).fetchall()
    return [seq for (seq,) in rows]


def addresses(hubs: Sequence[TestHub]) -> str:
    return ",".join(hub.target for hub in hubs)


# --- the address list --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("localhost:50051", "localhost:50051"),  # one address: as given, as before
        ("dns:///hubs.internal:50051", "dns:///hubs.internal:50051"),
        ("10.0.0.1:50051,10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        (" 10.0.0.1:1 , 10.0.0.2:2 ", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("[::1]:50051,[::1]:50052", "ipv6:[::1]:50051,[::1]:50052"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ],
)
def test_hub_addresses_become_grpc_targets(given: str, target: str) -> None:
    hub = parse_hub_target(given)
    assert hub.target == target
    several = "," in given or given.startswith("dns:")
    assert hub.several == several
    assert ("loadBalancingConfig" in hub.service_config({})) == several
    assert hub.channel_options() == ([("grpc.use_local_subchannel_pool", 1)] if several else [])


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("", "empty"),
        ("hub-a:50051,hub-b:50051", "is not an IP address"),
        ("127.0.0.1:1,,127.0.0.1:2", "empty address"),
        ("127.0.0.1:1,", "empty address"),
        ("127.0.0.1,127.0.0.1:2", "no port"),
        ("127.0.0.1:1,127.0.0.1:70000", "1 to 65535"),
        ("127.0.0.1:1,127.0.0.1:x", "1 to 65535"),
        ("127.0.0.1:1,127.0.0.1:\u00b2", "1 to 65535"),  # a digit to isdigit(), not to int()
        ("[fe80::1%eth0]:1,[fe80::2%eth0]:2", "no IPv6 zone id"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
        ("127.0.0.1:1,127.0.0.1:1", "twice"),
        ("::1:1,::1:2", "in brackets"),
        ("[127.0.0.1]:1,127.0.0.1:2", "brackets are for IPv6"),
        ("dns:///a:1,b:2", "dns: takes one name"),
        ("ipv6:127.0.0.1:1,127.0.0.1:2", "ipv6: with IPv4"),
        (",".join(f"127.0.0.1:{p}" for p in range(1, 100)), "at most 64"),
    ],
)
def test_a_malformed_address_list_is_refused_with_the_reason(given: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_hub_target(given)
    with pytest.raises(ValueError, match=why):
        HubClient(given, "AI_Node_1", "token", specialization=pb.SPECIALIZATION_GRAPHICS)


async def _trainer_cli(*argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer_service",
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("KERNELHUB_")},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def test_the_cli_refuses_a_malformed_hub_list_and_replicas_without_postgresql(
    tmp_path: Path,
) -> None:
    run = ["run", "--id", "AI_Node_1", "--specialization", "graphics", "--token", "t"]
    code, said = await _trainer_cli(*run, "--hub", "127.0.0.1:50051,hub-b:50051")
    assert code == 2 and "'hub-b:50051' in '127.0.0.1:50051,hub-b:50051' is not an IP" in said
    code, said = await _trainer_cli(
        "swarm", "--count", "2", "--hub", "127.0.0.1:1,127.0.0.1:1", "--tokens-file", "t"
    )
    assert code == 2 and "names 127.0.0.1:1 twice" in said
    for database in ([], ["--database-url", f"sqlite:///{tmp_path}/hub.db"]):
        code, said = await _trainer_cli("swarm", "--count", "2", "--replicas", "3", *database)
        assert code == 2, said
        assert "hub replicas share one PostgreSQL database: --replicas needs" in said
    assert not (tmp_path / "hub.db").exists()


# --- a swarm on three replicas -----------------------------------------------------------


class _Recorded(HubClient):
    """The real client, noting where its stream started and every event it handed on."""

    instances: list[_Recorded] = []  # noqa: RUF012 (one test's, reset by it)

    async def start(self) -> None:
        await super().start()
        # A fresh trainer starts from now: after its first Welcome's head (last_seq may
        # already be past it, by events read while start() returned).
        assert self.welcome is not None
        self.started_after = self.welcome.head_seq
        self.seqs: list[int] = []
        _Recorded.instances.append(self)

    async def events(self) -> AsyncIterator[pb.HubEvent | pb.TrainingSync]:
        async for item in super().events():
            if isinstance(item, pb.HubEvent):
                self.seqs.append(item.seq)
            yield item


async def test_a_swarm_spreads_over_three_replicas_and_every_trainer_gets_exactly_its_events(
    replica_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 30
    _Recorded.instances = []
    monkeypatch.setattr(trainer_module, "HubClient", _Recorded)
    samples: list[list[int]] = []
    async with embedded_hub(
        None,
        tempo=20,
        agents=[f"AI_Node_{i}" for i in range(1, count + 1)],
        database_url=replica_url,
        replicas=3,
    ) as (target, tokens, database_url):
        assert database_url == replica_url and target.startswith("ipv4:")
        hub_ports = [int(a.rsplit(":", 1)[1]) for a in target.removeprefix("ipv4:").split(",")]
        assert len(set(hub_ports)) == 3

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                ports = Counter(
                    c.raddr.port
                    for c in psutil.Process().net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.raddr
                )
                samples.append([ports[p] for p in hub_ports])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        stop = asyncio.Event()
        sampling = asyncio.create_task(sample(stop))
        result = await run_swarm(
            target=target,
            tokens=tokens,
            count=count,
            duration_seconds=12,
            seed=1,
            tempo=20,
            subscribe_all=True,  # so what each is entitled to is the log's, unfiltered
        )
        stop.set()
        await sampling
    assert result.failures == [], [(t.agent_id, t.error) for t in result.failures]
    # At some moment all 30 were connected, one connection each, over all three replicas.
    full = [s for s in samples if sum(s) == count]
    assert full, f"never all {count} connected at once: {samples}"
    assert all(n > 0 for n in full[-1]), f"not spread over the replicas: {full[-1]}"
    assert result.stats is not None and result.stats.head_seq > count
    conninfo = _conninfo(replica_url)
    logged = await log_seqs(conninfo)
    assert logged == list(range(1, len(logged) + 1))  # no gap, no duplicate
    clients = {c.agent_id: c for c in _Recorded.instances}
    assert sorted(clients) == sorted(tokens)
    middle = logged[len(logged) // 2]
    for agent_id, client in clients.items():
        upto = client.last_processed_seq
        assert upto >= middle, f"{agent_id} stopped receiving at {upto} (log head {logged[-1]})"
        expected = await entitled(conninfo, agent_id, client.started_after, upto)
        assert client.seqs == expected, f"{agent_id}: not exactly its events, once, in order"


# --- SIGKILL one replica mid-run ---------------------------------------------------------


async def test_killing_a_replica_mid_run_its_clients_fail_over_and_nothing_is_lost(
    replica_url: str,
) -> None:
    names = [f"AI_Node_{i}" for i in range(15)]
    shares = 12
    async with replicas(replica_url, 3, agents=names) as running:
        hubs = running.hubs
        clients = [
            HubClient(
                addresses(hubs),
                name,
                running.tokens[name],
                specialization=pb.SPECIALIZATION_NETWORKING,
                backoff_cap=1.0,
            )
            for name in names
        ]
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            before = await settled_spread(hubs, len(clients))
            victim = max(range(3), key=lambda i: before[i])  # holds at least 5 of the 15
            received: dict[str, list[int]] = {c.agent_id: [] for c in clients}

            arrived = asyncio.Condition()

            async def consume(client: HubClient) -> None:
                async for item in client.events():
                    if isinstance(item, pb.HubEvent) and item.HasField("artifact_shared"):
                        received[client.agent_id].append(item.seq)
                        async with arrived:
                            arrived.notify_all()

            consumers = [asyncio.create_task(consume(c)) for c in clients]
            receipts: dict[str, pb.Receipt] = {}
            halfway = asyncio.Event()

            async def share(client: HubClient) -> None:
                for i in range(shares):
                    message_id = f"{client.agent_id}-{i}"
                    receipts[message_id] = await client.send(
                        pb.ConnectRequest(
                            message_id=message_id,
                            share_pattern=pb.SharePattern(pattern=pattern(message_id)),
                        )
                    )
                    if len(receipts) >= len(clients) * shares // 3:
                        halfway.set()

            sharing = [asyncio.create_task(share(c)) for c in clients]
            await asyncio.wait_for(halfway.wait(), 60)
            await hubs[victim].kill()  # SIGKILL: no drain, no goodbye
            await asyncio.wait_for(asyncio.gather(*sharing), 90)
            sent = {m: r.seq for m, r in receipts.items()}
            assert len(sent) == len(clients) * shares  # every message receipted
            assert len(set(sent.values())) == len(sent)  # each at its own seq
            by_sender = {
                c.agent_id: {s for m, s in sent.items() if m.startswith(f"{c.agent_id}-")}
                for c in clients
            }

            async def caught_up(client: HubClient) -> None:
                others = set().union(*(v for k, v in by_sender.items() if k != client.agent_id))
                async with arrived:
                    await arrived.wait_for(lambda: others <= set(received[client.agent_id]))

            await asyncio.wait_for(asyncio.gather(*(caught_up(c) for c in clients)), 60)
            after = spread(hubs)
            for task in consumers:
                task.cancel()
        # Those on the victim reconnected, to the others; nobody else needed to.
        moved = [c for c in clients if c.reconnects > 0]
        assert len(moved) >= before[victim], (before, [c.reconnects for c in clients])
        assert after[victim] == 0 and sum(after) == len(clients), (before, after)
        for client in clients:
            others = sorted(set().union(*(v for k, v in by_sender.items() if k != client.agent_id)))
            assert received[client.agent_id] == others, f"{client.agent_id}: lost or repeated"
    conninfo = _conninfo(replica_url)
    async with await psycopg.AsyncConnection.connect(conninfo) as db:
        stored = await (
            await db.execute("SELECT artifact_id, seq, name FROM artifact ORDER BY seq")
        ).fetchall()
    # Every receipted message stored exactly once: one artifact per message, at its seq.
    assert sorted(seq for _, seq, _ in stored) == sorted(sent.values())
    assert {r.resource_id for r in receipts.values()} == {a for a, _, _ in stored}
    logged = await log_seqs(conninfo)
    assert logged == list(range(1, len(logged) + 1))


# --- the Node example ---------------------------------------------------------------------


@pytest.mark.skipif(NODE is None, reason="node is not installed (scripts/setup installs nodejs)")
async def test_the_node_trainer_fails_over_to_the_second_replica(
    replica_url: str, tmp_path: Path
) -> None:
    async with replicas(replica_url, 2, agents=["AI_Node_2", "AI_Node_1"]) as running:
        hubs, tokens = running.hubs, running.tokens
        async with (
            HubClient(
                addresses(hubs),
                "AI_Node_1",
                tokens["AI_Node_1"],
                specialization=pb.SPECIALIZATION_NETWORKING,
            ) as python,
            node_trainer(
                addresses(hubs),
                tokens["AI_Node_2"],
                tmp_path / "AI_Node_2.seq",
                KERNELHUB_DURATION="170",  # ended by SIGTERM below; within the test's 180 s
            ) as node,
        ):
            first = await node.expect("welcome", agent_id="AI_Node_2")
            assert first["reconnects"] == 0
            await node.expect("receipt", what="share_code_component")
            on = next(i for i, h in enumerate(hubs) if first["peer"].endswith(f":{h.port}"))
            p1 = await python.share_pattern(pattern("before"))
            await node.expect("artifact_shared", artifact_id=p1.resource_id)
            await hubs[on].kill()
            p2 = await python.share_pattern(pattern("during"))  # while node is away
            await node.expect("artifact_shared", artifact_id=p2.resource_id)
            # The stream that brought it (a first reconnect may fail while the kill settles).
            again = node.of("welcome")[-1]
            assert again["reconnects"] >= 1
            assert again["peer"].endswith(f":{hubs[1 - on].port}")
            assert int(again["resume_after_seq"]) >= p1.seq
            p3 = await python.share_pattern(pattern("after"))
            await node.expect("artifact_shared", artifact_id=p3.resource_id)
            lost = node.of("stream_error")
            assert lost and lost[0]["code_name"] == "UNAVAILABLE", lost
            node.process.send_signal(signal.SIGTERM)
            assert await node.wait() == 0, node.stderr
            # Each share once, whichever replica it came from; its own two stored once each.
            assert [line["name"] for line in node.of("artifact_shared")] == [
                "before",
                "during",
                "after",
            ]
            [end] = node.of("end")
            assert end["unanswered"] == 0
    async with await psycopg.AsyncConnection.connect(_conninfo(replica_url)) as db:
        names = await (
            await db.execute(
                "SELECT name FROM artifact WHERE contributor_id = 'AI_Node_2' ORDER BY seq"
            )
        ).fetchall()
    assert [n for (n,) in names] == ["graphics_pattern", "blend_span"]

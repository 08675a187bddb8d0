"""Prometheus metrics: `/metrics` scraped from a real hub while real trainers run, parsed with
Prometheus' own text parser, matches what the trainers were answered and GetHubStats."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.metrics import KINDS, HubMetrics, MetricsEndpoint
from hub_service.roles import Role
from hub_service.server import HubServer
from hub_service.settings import SettingsError, load_settings
from hub_service.testing import TestHub
from trainer_service.simulation.swarm import agent_ids, run_swarm

from .conftest import EOF, WAIT, HubHarness, auth, hello, make_config, pattern
from .workload import run_workload

ROOT = Path(__file__).resolve().parents[1]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of one scrape, parsed by prometheus_client's own text-format parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def metric(name: str, **labels: str) -> str:
    """A key for `settled`: the metric name and its labels."""
    return name + "".join(f"|{k}={v}" for k, v in sorted(labels.items()))


def lookup(samples: Samples, key: str) -> float:
    name, *pairs = key.split("|")
    return samples[(name, frozenset(tuple(p.split("=", 1)) for p in pairs))]  # type: ignore[misc]


async def settle(port: int, wanted: dict[str, float]) -> Samples:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        samples = await asyncio.to_thread(scrape, port)
        got = {key: lookup(samples, key) for key in wanted}
        if got == wanted:
            return samples
        if loop.time() > deadline:
            pytest.fail(f"metrics never matched: got {got}, expected {wanted}")
        await asyncio.sleep(0.05)


async def test_metrics_match_the_answers_and_the_stats(database_url: str) -> None:
    async with TestHub.in_process(make_config(database_url, metrics_port=0)) as hub:
        assert hub.server.metrics_endpoint is not None
        harness = HubHarness(hub.server)
        try:
            work = await run_workload(harness)
            stats: pb.GetHubStatsResponse = await harness.query(
                "GetHubStats", pb.GetHubStatsRequest()
            )
            events = sum(len(t.events) for t in work.trainers)
            wanted = {
                metric("kernelhub_receipts_total"): float(
                    sum(work.committed.values()) + sum(work.duplicates.values())
                ),
                metric("kernelhub_events_delivered_total"): float(events),
                metric("kernelhub_connections"): float(stats.agents_online),
                metric("kernelhub_log_head_seq"): float(stats.head_seq),
                metric("kernelhub_request_errors_total", code="INVALID_ARGUMENT"): 1.0,
                metric("kernelhub_outbound_fallbacks_total"): 0.0,
            }
            for kind in KINDS:
                for outcome, counted in (
                    ("committed", work.committed[kind]),
                    ("duplicate", work.duplicates[kind]),
                    ("refused", sum(n for (k, _), n in work.refused.items() if k == kind)),
                ):
                    key = metric("kernelhub_messages_received_total", kind=kind, outcome=outcome)
                    wanted[key] = float(counted)
            samples = await settle(hub.server.metrics_endpoint.port, wanted)
        finally:
            await harness.close()
        # The stats' knowledge base is the committed shares (completions and deliveries are
        # OS components too).
        kb = stats.knowledge_base
        assert kb.pattern_count == work.committed["share_pattern"] == 6
        assert kb.code_component_count == work.committed["share_code_component"] == 1
        assert kb.os_component_count == (
            work.committed["share_os_component"]
            + work.committed["deliver_feature"]
            + work.committed["complete_collaboration"]
        )
        assert stats.agents_online == 3 and events > 0 and work.duplicates["share_pattern"] == 1
        # Every group commit is observed once, with its size.
        commits = value(samples, "kernelhub_commit_duration_seconds_count")
        assert commits == value(samples, "kernelhub_commit_batch_size_count") > 0
        assert value(samples, "kernelhub_commit_batch_size_sum") >= sum(work.committed.values())
        assert value(samples, "kernelhub_commit_duration_seconds_sum") > 0
        assert hub.server.committer.commits >= commits  # it counts on after the scrape


async def test_a_swarm_scraped_while_it_runs_matches_the_stats(database_url: str) -> None:
    """The simulated trainers (HubClient, resends and all) against a real hub, scraped over and
    over while they run: every scrape parses, no counter ever goes down, and once they are
    done what was committed equals what GetHubStats counts, kind by kind."""
    config = make_config(database_url, metrics_port=0, training_sync_interval=1.0)
    async with TestHub.in_process(config) as hub:
        assert hub.server.metrics_endpoint is not None
        port = hub.server.metrics_endpoint.port
        ids = agent_ids(4)
        tokens = await hub.issue_tokens(*ids)
        swarm = asyncio.create_task(
            run_swarm(
                target=hub.target, tokens=tokens, count=4, duration_seconds=3, seed=3, tempo=20
            )
        )
        scrapes: list[Samples] = []
        while not swarm.done():
            scrapes.append(await asyncio.to_thread(scrape, port))
            await asyncio.sleep(0.1)  # a scraper's interval, not a wait for anything
        result = await swarm
        assert not result.failures
        # Once every trainer's leaving is committed, nothing else changes: compare then.
        harness = HubHarness(hub.server)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT
            while (
                stats := await harness.query("GetHubStats", pb.GetHubStatsRequest())
            ).agents_online:
                assert loop.time() < deadline, "the trainers never went offline"
                await asyncio.sleep(0.05)
        finally:
            await harness.close()
        kb = stats.knowledge_base
        final = await asyncio.to_thread(scrape, port)
    counters = [k for k in final if k[0].endswith(("_total", "_count", "_sum", "_bucket"))]
    for before, after in itertools.pairwise([*scrapes, final]):
        assert all(before.get(k, 0.0) <= after[k] for k in counters)
    assert len(scrapes) >= 2

    def committed(kind: str) -> float:
        return value(final, "kernelhub_messages_received_total", kind=kind, outcome="committed")

    assert committed("share_pattern") == kb.pattern_count > 0
    assert committed("share_code_component") == kb.code_component_count
    assert (
        committed("share_os_component")
        + committed("deliver_feature")
        + committed("complete_collaboration")
        == kb.os_component_count
    )
    assert committed("request_feature") == kb.feature_request_count
    assert committed("deliver_feature") == stats.feature_delivery_count
    assert committed("propose_collaboration") == sum(stats.collaborations_by_state.values())
    assert value(final, "kernelhub_log_head_seq") == stats.head_seq
    assert value(final, "kernelhub_connections") == stats.agents_online == 0


async def test_refusals_by_each_limit_are_counted(database_url: str) -> None:
    config = make_config(
        database_url,
        metrics_port=0,
        rate_limit_per_second=0.01,
        rate_limit_burst=2,
        connect_rate_per_second=0.01,
        connect_burst=1,
        max_connections=1,
    )
    async with TestHub.in_process(config) as hub:
        assert hub.server.metrics_endpoint is not None
        harness = HubHarness(hub.server)
        try:
            a = await harness.connect("AI_Node_1")
            mids = [
                await a.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
                for i in range(5)
            ]
            answers = [await a.answer(mid) for mid in mids]
            limited = [x for x in answers if isinstance(x, pb.RequestError)]
            assert len(limited) == 3 and all(x.code == 8 for x in limited)  # RESOURCE_EXHAUSTED
            for agent_id in ("AI_Node_1", "AI_Node_2"):  # over its connect rate; over the limit
                call = harness.stub.Connect(metadata=auth(await harness.token(agent_id)))
                await call.write(pb.ConnectRequest(message_id="h", hello=hello(agent_id)))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(call.read(), WAIT)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Anything but Hello first ends the stream before admission.
            call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_3")))
            await call.write(pb.ConnectRequest(message_id="x", share_pattern=pb.SharePattern()))
            with pytest.raises(grpc.aio.AioRpcError) as early:
                await asyncio.wait_for(call.read(), WAIT)
            assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            await settle(
                hub.server.metrics_endpoint.port,
                {
                    metric("kernelhub_rate_limited_total", limit="messages"): 3.0,
                    metric("kernelhub_rate_limited_total", limit="connects"): 1.0,
                    metric("kernelhub_rate_limited_total", limit="connections"): 1.0,
                    metric("kernelhub_request_errors_total", code="RESOURCE_EXHAUSTED"): 3.0,
                    metric(
                        "kernelhub_messages_received_total", kind="share_pattern", outcome="refused"
                    ): 3.0,
                    metric(
                        "kernelhub_messages_received_total",
                        kind="share_pattern",
                        outcome="committed",
                    ): 2.0,
                    metric("kernelhub_connections"): 1.0,
                    metric("kernelhub_streams_ended_total", code="RESOURCE_EXHAUSTED"): 2.0,
                    metric("kernelhub_streams_ended_total", code="FAILED_PRECONDITION"): 1.0,
                    metric("kernelhub_streams_ended_total", code="OK"): 0.0,
                },
            )
        finally:
            await harness.close()


async def test_refused_and_failed_calls_are_counted_by_rpc_and_code(database_url: str) -> None:
    """The token checks' refusals and the unary RPCs' errors, which no stream counter sees."""
    config = make_config(database_url, metrics_port=0)
    async with TestHub.in_process(config) as hub:
        assert hub.server.metrics_endpoint is not None
        harness = HubHarness(hub.server)
        try:
            stub = harness.stub
            for metadata in (None, auth("kh_not_a_token")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListAgents(pb.ListAgentsRequest(), metadata=metadata, timeout=WAIT)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            observer = auth(await harness.token("dash", role=Role.OBSERVER))
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.ListTokens(pb.ListTokensRequest(), metadata=observer, timeout=WAIT)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetArtifact(
                    pb.GetArtifactRequest(artifact_id="art_nope"), metadata=observer, timeout=WAIT
                )
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            await settle(
                hub.server.metrics_endpoint.port,
                {
                    metric(
                        "kernelhub_rpc_errors_total", method="ListAgents", code="UNAUTHENTICATED"
                    ): 2.0,
                    metric(
                        "kernelhub_rpc_errors_total", method="ListTokens", code="PERMISSION_DENIED"
                    ): 1.0,
                    metric(
                        "kernelhub_rpc_errors_total", method="GetArtifact", code="NOT_FOUND"
                    ): 1.0,
                },
            )
        finally:
            await harness.close()


async def test_fallbacks_to_the_log_are_counted(database_url: str) -> None:
    """A live queue of one event overflows when a batch's events arrive together: each
    overflow is one fallback, as the connections themselves count them."""
    config = make_config(database_url, metrics_port=0, outbound_queue_size=1)
    async with TestHub.in_process(config) as hub:
        assert hub.server.metrics_endpoint is not None
        harness = HubHarness(hub.server)
        try:
            sender = await harness.connect("AI_Node_1")
            reader = await harness.connect("AI_Node_2")
            batch = pb.RequestBatch(
                requests=[
                    pb.ConnectRequest(
                        message_id=f"m{i}", share_pattern=pb.SharePattern(pattern=pattern(f"p{i}"))
                    )
                    for i in range(32)
                ]
            )
            await sender.send(batch=batch)
            last = await sender.receipt("m31")
            await reader.until_seq(last.seq)
            seqs = [e.seq for e in reader.events]
            assert seqs == sorted(set(seqs))  # in order, once each, through the fallback
            fell_behind = sum(c.fell_behind for c in hub.server.router.connections())
            assert fell_behind > 0
            # The reader half-closes: answered, its stream ends OK.
            await reader.call.done_writing()
            while await asyncio.wait_for(reader.call.read(), WAIT) is not EOF:
                pass
            assert await reader.call.code() == grpc.StatusCode.OK
            await settle(
                hub.server.metrics_endpoint.port,
                {
                    metric("kernelhub_outbound_fallbacks_total"): float(fell_behind),
                    metric("kernelhub_streams_ended_total", code="OK"): 1.0,
                },
            )
        finally:
            await harness.close()


async def test_metrics_are_off_unless_a_port_is_set(database_url: str) -> None:
    async with TestHub.in_process(make_config(database_url)) as hub:
        assert hub.server.metrics_endpoint is None
    with pytest.raises(SettingsError, match="KERNELHUB_METRICS_PORT"):
        load_settings({"KERNELHUB_METRICS_PORT": "70000"})
    assert load_settings({"KERNELHUB_METRICS_PORT": "9464"}).settings.metrics_port == 9464


async def test_a_metrics_port_in_use_stops_the_start(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config: HubConfig = make_config(database_url, metrics_port=taken.getsockname()[1])
        hub = HubServer(config)
        with pytest.raises(OSError, match="in use"):
            await hub.start()
        assert hub.metrics_endpoint is None
        # What it started is released: the same database serves a new hub at once.
        async with TestHub.in_process(make_config(database_url)) as again:
            assert again.port > 0


def test_every_metric_is_in_the_readme() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_table.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = {doc.name for doc in HubMetrics().docs}
    assert len(names) == len(HubMetrics().docs)  # no name defined twice
    assert all(name.startswith("kernelhub_") for name in names)


async def scrape_once_free(port: int) -> Samples:
    """A scrape, tried again (within WAIT) while the endpoint refuses it: its slots are
    freed by the handlers' threads, a moment after their connections close."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        try:
            return await asyncio.to_thread(scrape, port)
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
            assert loop.time() < deadline, "the endpoint never served again"
            await asyncio.sleep(0.05)


async def test_scrapers_are_bounded_in_number_and_time() -> None:
    """Beyond its clients the endpoint closes a connection unanswered; a client that stalls
    is closed after its timeout; and each freed slot serves again."""
    endpoint = MetricsEndpoint(HubMetrics(), "127.0.0.1", 0, max_clients=2, client_timeout=60)
    port = endpoint.start()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(2)]
    try:
        with pytest.raises((ConnectionError, http.client.HTTPException, urllib.error.URLError)):
            await asyncio.to_thread(scrape, port)
        for connection in idle:
            connection.close()  # the two slots come free
        samples = await scrape_once_free(port)
        assert value(samples, "kernelhub_receipts_total") == 0
    finally:
        for connection in idle:
            connection.close()
        await endpoint.stop()

    stalling = MetricsEndpoint(HubMetrics(), "127.0.0.1", 0, max_clients=1, client_timeout=0.2)
    port = stalling.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
            # Nothing sent: the endpoint ends the connection itself (EOF) within its timeout.
            assert await asyncio.to_thread(connection.recv, 1) == b""
        # Its slot comes free just after the EOF (the handler's thread releases it last).
        samples = await scrape_once_free(port)
        assert value(samples, "kernelhub_connections") == 0
    finally:
        await stalling.stop()

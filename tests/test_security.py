"""TLS and mutual TLS, live token revocation, rate and connection limits, keepalive abuse."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import trustme

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer

from .conftest import WAIT, HubHarness, async_stub, auth, hello, make_config, pattern


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("AI_Node_1@clients.kernelhub")
    files = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    return files


async def _running(config: HubConfig) -> AsyncIterator[HubServer]:
    server = HubServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _hello_over(channel: grpc.aio.Channel, token: str) -> pb.ConnectResponse:
    call = async_stub(channel).Connect(metadata=auth(token))
    await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_1")))
    response = await asyncio.wait_for(call.read(), WAIT)
    call.cancel()
    return response  # type: ignore[no-any-return]


async def test_tls_serves_trusting_clients_only(
    database_url: str, tls_files: dict[str, Path]
) -> None:
    config = make_config(
        database_url, tls_cert=str(tls_files["cert"]), tls_key=str(tls_files["key"])
    )
    async for server in _running(config):
        token = await server.issue_token("AI_Node_1")
        trusted = grpc.ssl_channel_credentials(root_certificates=tls_files["ca"].read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", trusted) as channel:
            assert (await _hello_over(channel, token)).welcome.agent_id == "AI_Node_1"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _hello_over(channel, token)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate(
    database_url: str, tls_files: dict[str, Path]
) -> None:
    config = make_config(
        database_url,
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        tls_client_ca=str(tls_files["ca"]),
    )
    async for server in _running(config):
        token = await server.issue_token("AI_Node_1")
        root = tls_files["ca"].read_bytes()
        without = grpc.ssl_channel_credentials(root_certificates=root)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", without) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _hello_over(channel, token)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=tls_files["client_key"].read_bytes(),
            certificate_chain=tls_files["client_cert"].read_bytes(),
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", with_cert) as channel:
            assert (await _hello_over(channel, token)).welcome.agent_id == "AI_Node_1"


async def test_tls_needs_both_cert_and_key(database_url: str, tls_files: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        await HubServer(make_config(database_url, tls_cert=str(tls_files["cert"]))).start()


async def test_revoking_a_token_ends_its_live_stream(database_url: str) -> None:
    async for server in _running(make_config(database_url, token_recheck_interval=0.2)):
        harness = HubHarness(server)
        revoked = await harness.connect("AI_Node_1")
        other = await harness.connect("AI_Node_2")
        assert await server.store.revoke_tokens("AI_Node_1") == 1
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await revoked._read_one()
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (ended.value.details() or "")
        # The other agent is untouched and is told the revoked one left.
        await other.left("AI_Node_1")
        mid = await other.send(share_pattern=pb.SharePattern(pattern=pattern()))
        assert (await other.receipt(mid)).seq > 0
        await harness.close()


async def test_refused_batches_count_against_the_rate_limit(database_url: str) -> None:
    """A malformed batch is answered with its error, but costs a message of the rate like
    any other: a client cannot send refused batches (4 MiB each) without limit."""
    config = make_config(database_url, rate_limit_per_second=0.5, rate_limit_burst=3)
    async for server in _running(config):
        harness = HubHarness(server)
        agent = await harness.connect("AI_Node_1")
        sent = [await agent.send(batch=pb.RequestBatch()) for _ in range(8)]  # empty: invalid
        codes = [(await agent.answer(mid)).code_name for mid in sent]  # type: ignore[union-attr]
        assert set(codes) == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, codes
        assert codes.count("INVALID_ARGUMENT") < 8
        await harness.close()


async def test_rate_limit_refuses_the_excess_with_a_clear_error(database_url: str) -> None:
    config = make_config(database_url, rate_limit_per_second=2, rate_limit_burst=5)
    async for server in _running(config):
        harness = HubHarness(server)
        agent = await harness.connect("AI_Node_1")
        sent = [
            await agent.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
            for i in range(12)
        ]
        answers = [await agent.answer(mid) for mid in sent]
        accepted = [a for a in answers if isinstance(a, pb.Receipt)]
        refused = [a for a in answers if isinstance(a, pb.RequestError)]
        assert 5 <= len(accepted) < 12  # the burst, plus whatever refilled meanwhile
        assert refused and all(e.code_name == "RESOURCE_EXHAUSTED" for e in refused)
        assert "rate limit: at most 2 messages/s" in refused[0].message
        listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
        assert len(listed.artifacts) == len(accepted)  # refused messages stored nothing
        # The stream survives; a refused message_id can be resent once the bucket refills.
        retry = refused[0].message_id
        while True:
            await agent.send(retry, share_pattern=pb.SharePattern(pattern=pattern("retry")))
            del agent.errors[retry]
            if isinstance(await agent.answer(retry), pb.Receipt):
                break
            await asyncio.sleep(0.25)  # the bucket refills at 2/s: wait for a token, not a race
        await harness.close()


async def test_connection_limit(database_url: str) -> None:
    async for server in _running(make_config(database_url, max_connections=2)):
        harness = HubHarness(server)
        await harness.connect("AI_Node_1")
        await harness.connect("AI_Node_2")
        call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_3")))
        await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_3")))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call.read(), WAIT)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 live connections" in (refused.value.details() or "")
        # An agent already connected may still reconnect (it supersedes itself).
        again = await harness.connect("AI_Node_1")
        assert again.welcome.agent_id == "AI_Node_1"
        await harness.close()


async def test_ping_flood_closes_only_the_abusive_connection(database_url: str) -> None:
    config = make_config(database_url, min_client_ping_interval=10.0)
    async for server in _running(config):
        harness = HubHarness(server)
        calm = await harness.connect("AI_Node_2")
        token = await harness.token("AI_Node_1")
        flood_options = [
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", options=flood_options
        ) as ch:
            call = async_stub(ch).Connect(metadata=auth(token))
            await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_1")))
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    await asyncio.wait_for(call.read(), WAIT * 2)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        mid = await calm.send(share_pattern=pb.SharePattern(pattern=pattern()))
        assert (await calm.receipt(mid)).seq > 0
        await harness.close()


async def test_runner_speaks_mutual_tls(database_url: str, tls_files: dict[str, Path]) -> None:
    config = make_config(
        database_url,
        tls_cert=str(tls_files["cert"]),
        tls_key=str(tls_files["key"]),
        tls_client_ca=str(tls_files["ca"]),
    )
    async for server in _running(config):
        token = await server.issue_token("AI_Node_1")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "trainer_service",
            "run",
            "--id",
            "AI_Node_1",
            "--specialization",
            "security",
            "--duration",
            "2s",
            "--tempo",
            "20",
            "--hub",
            f"127.0.0.1:{server.port}",
            "--token",
            token,
            "--tls-ca",
            str(tls_files["ca"]),
            "--tls-cert",
            str(tls_files["client_cert"]),
            "--tls-key",
            str(tls_files["client_key"]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        stats = await server.store.stats()
        assert stats.knowledge_base.pattern_count > 0

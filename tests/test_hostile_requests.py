"""Hostile bytes and identities: undecodable requests on every RPC, token ids Hello would refuse,
Hello's own message_id, and TCP connections that never speak HTTP/2."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import auth as hub_auth
from hub_service.config import HubConfig
from hub_service.errors import StatusError
from hub_service.roles import Role
from hub_service.server import HubServer
from hub_service.sql_store import SqlStore

from .conftest import WAIT, HubHarness, auth, hello, pattern, target

GARBAGE = b"\xff" * 10  # not a valid protobuf of any message type
HUB = pb.DESCRIPTOR.services_by_name["HubService"]
QUERIES = [m for m in HUB.methods if not m.client_streaming and not m.server_streaming]
# Open to everyone (no token), for operators and load balancers.
HEALTH = [("/grpc.health.v1.Health/Check", False), ("/grpc.health.v1.Health/Watch", True)]
HEALTH_REQUEST = health_pb2.HealthCheckRequest.DESCRIPTOR.full_name
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_REQUEST = reflection_pb2.ServerReflectionRequest.DESCRIPTOR.full_name


def _path(method: MethodDescriptor) -> str:
    return f"/{HUB.full_name}/{method.name}"


async def _unary(
    channel: grpc.aio.Channel, path: str, data: bytes, metadata: list[tuple[str, str]] | None
) -> grpc.aio.AioRpcError:
    """The status of a unary request carrying `data` as its raw bytes (no serializer)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(path)(data, metadata=metadata, timeout=WAIT)
    return raised.value


async def _stream_status(call: grpc.aio.Call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    return raised.value


async def test_query_rpcs_refuse_undecodable_bytes_unauthenticated_before_decoding(
    harness: HubHarness,
) -> None:
    assert len(QUERIES) == 11  # six queries, three token RPCs, ClaimValidation, SubmitVerdict
    for method in QUERIES:
        for metadata in (None, [("authorization", "Bearer kh_not_a_real_token")]):
            error = await _unary(harness.channel, _path(method), GARBAGE, metadata)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method.name, error)
    watch = _path(HUB.methods_by_name["Watch"])
    error = await _stream_status(harness.channel.unary_stream(watch)(GARBAGE, timeout=WAIT))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error


async def test_query_rpcs_answer_undecodable_bytes_invalid_argument_with_a_token(
    harness: HubHarness,
) -> None:
    metadata = auth(await harness.token("ops", role=Role.ADMIN))  # may call all but two
    # The validators' RPCs with a token allowed to call them.
    validator = auth(await harness.token("validator", role=Role.VALIDATOR))
    for method in QUERIES:
        allowed = validator if method.name in ("ClaimValidation", "SubmitVerdict") else metadata
        error = await _unary(harness.channel, _path(method), GARBAGE, allowed)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, error)
        assert f"not a valid {method.input_type.full_name}" in (error.details() or "")
    watch = _path(HUB.methods_by_name["Watch"])
    call = harness.channel.unary_stream(watch)(GARBAGE, metadata=metadata, timeout=WAIT)
    error = await _stream_status(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "not a valid kernelhub.v1.WatchRequest" in (error.details() or "")
    # Nothing was lost: the same channel and token still get answers.
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert isinstance(stats, pb.GetHubStatsResponse)


async def test_artifact_id_that_is_not_utf8_is_invalid_argument(harness: HubHarness) -> None:
    number = pb.GetArtifactRequest.DESCRIPTOR.fields_by_name["artifact_id"].number
    not_utf8 = bytes([number << 3 | 2, 2]) + b"\xff\xfe"  # a length-delimited string field
    path = _path(HUB.methods_by_name["GetArtifact"])
    error = await _unary(harness.channel, path, not_utf8, None)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await _unary(harness.channel, path, not_utf8, auth(await harness.token("observer")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid kernelhub.v1.GetArtifactRequest" in (error.details() or "")


async def test_open_services_answer_undecodable_bytes_invalid_argument(
    harness: HubHarness,
) -> None:
    for path, streaming in HEALTH:
        if streaming:
            call = harness.channel.unary_stream(path)(GARBAGE, timeout=WAIT)
            error = await _stream_status(call)
        else:
            error = await _unary(harness.channel, path, GARBAGE, None)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error)
        assert f"not a valid {HEALTH_REQUEST}" in (error.details() or "")
    call = harness.channel.stream_stream(REFLECTION)(timeout=WAIT)
    await call.write(GARBAGE)
    error = await _stream_status(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"not a valid {REFLECTION_REQUEST}" in (error.details() or "")


async def test_connect_still_answers_undecodable_bytes_itself(harness: HubHarness) -> None:
    path = _path(HUB.methods_by_name["Connect"])
    for metadata, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (auth(await harness.token("AI_Node_1")), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        call = harness.channel.stream_stream(path)(metadata=metadata, timeout=WAIT)
        # Without credentials the hub refuses the stream as it opens: the write may lose
        # that race client-side (it then raises the same status); the status is the answer.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.write(GARBAGE)
        error = await _stream_status(call)
        assert error.code() == code, error
    assert "not a ConnectRequest" in (error.details() or "")


async def test_a_flood_of_undecodable_requests_logs_a_few_short_lines_and_no_traceback(
    harness: HubHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    metadata = auth(await harness.token("observer"))
    path = _path(HUB.methods_by_name["GetHubStats"])
    flood = 60
    started = time.monotonic()
    for i in range(flood):
        error = await _unary(harness.channel, path, GARBAGE, metadata if i % 2 else None)
        expected = grpc.StatusCode.INVALID_ARGUMENT if i % 2 else grpc.StatusCode.UNAUTHENTICATED
        assert error.code() == expected
    for _ in range(flood // 2):  # open to everyone, so decoded without a token
        error = await _unary(harness.channel, HEALTH[0][0], GARBAGE, None)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    elapsed = time.monotonic() - started
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text
    reports = [r for r in caplog.records if "undecodable" in r.getMessage()]
    # One line per report interval at most (and the first at once), whatever the flood.
    assert 1 <= len(reports) <= 1 + elapsed / hub_auth.UNDECODABLE_REPORT_INTERVAL
    assert all(len(r.getMessage()) < 300 for r in reports)
    assert sum(len(r.getMessage()) for r in caplog.records) < 2000


async def test_hello_message_id_is_checked_like_every_other(harness: HubHarness) -> None:
    token = await harness.token("AI_Node_1")
    for message_id in ("m" * 1000, "id with spaces"):
        call = harness.stub.Connect(metadata=auth(token))
        await call.write(pb.ConnectRequest(message_id=message_id, hello=hello("AI_Node_1")))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), WAIT)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "message_id" in (raised.value.details() or "")
    # Optional, as before (Hello gets no receipt); a valid one is welcome too.
    for message_id in ("", "hello"):
        call = harness.stub.Connect(metadata=auth(token))
        await call.write(pb.ConnectRequest(message_id=message_id, hello=hello("AI_Node_1")))
        first = await asyncio.wait_for(call.read(), WAIT)
        assert isinstance(first, pb.ConnectResponse) and first.welcome.agent_id == "AI_Node_1"
        call.cancel()


BAD_IDS = ["bad id!", "-starts-with-a-dash", "a" * 129, ""]


async def test_store_refuses_a_token_for_an_id_hello_would_refuse(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'tokens.db'}", writer="thread")
    await store.open()
    try:
        for agent_id in BAD_IDS:
            with pytest.raises(StatusError) as refused:
                await store.issue_token(agent_id)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "agent_id" in refused.value.message
        assert await store.list_tokens() == []
        assert (await store.issue_token("AI_Node_1.a:b-c_d")).agent_id == "AI_Node_1.a:b-c_d"
    finally:
        await store.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KERNELHUB_LOG_LEVEL": "WARNING"},
    )


def test_token_issue_refuses_an_id_hello_would_refuse_and_issues_none(tmp_path: Path) -> None:
    db = str(tmp_path / "hub.db")
    issued = _cli("token", "issue", "AI_Node_1", "bad id!", "--db", db)
    assert issued.returncode != 0
    assert "'bad id!'" in issued.stderr
    assert "may contain only letters, digits and _ . : -" in issued.stderr
    assert "kh_" not in issued.stdout  # no token was shown, so none is in use
    listed = _cli("token", "list", "--db", db)
    assert listed.returncode == 0, listed.stderr
    assert "AI_Node_1" not in listed.stdout  # all or nothing


@pytest.fixture
async def impatient_hub(database_url: str) -> AsyncIterator[HubServer]:
    """A hub whose handshake timeout is one second, set as an operator would."""
    config = HubConfig.from_env(
        {
            "KERNELHUB_HOST": "127.0.0.1",
            "KERNELHUB_PORT": "0",
            "KERNELHUB_DATABASE_URL": database_url,
            "KERNELHUB_TRAINING_SYNC_INTERVAL": "0",
            "KERNELHUB_HANDSHAKE_TIMEOUT": "1",
        }
    )
    server = HubServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_connection_that_never_sends_the_http2_preface_is_closed(
    impatient_hub: HubServer,
) -> None:
    harness = HubHarness(impatient_hub)
    try:
        trainer = await harness.connect("AI_Node_1")  # a connection that did its handshake
        host, port = target(impatient_hub).split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:

            async def until_closed() -> None:
                while await reader.read(4096):  # the hub's SETTINGS, then its GOAWAY
                    pass

            # Well before gRPC's default of 120 s: the socket is closed, not left to idle.
            await asyncio.wait_for(until_closed(), 2 * WAIT)
        finally:
            writer.close()
        # The timer is for handshakes only: the established stream, older than it, still works.
        message_id = await trainer.send(share_pattern=pb.SharePattern(pattern=pattern()))
        assert (await trainer.receipt(message_id)).seq > 0
        await trainer.close()
    finally:
        await harness.close()

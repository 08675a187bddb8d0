"""Validators through a real hub: roles, the claim's bounded wait, verdicts on the record
(GetArtifact, ListArtifacts' filter, GetHubStats, the contributor's `artifact_validated`),
refusals a hostile or late validator gets, and the queue across a hub restart."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role
from hub_service.testing import TestHub
from trainer_service import HubClient

from .conftest import async_stub, auth, code_component, make_config

NET = pb.SPECIALIZATION_NETWORKING
PASSED = pb.ValidationVerdict(
    state=pb.VALIDATION_STATE_PASSED, build_ok=True, tests_run=1, tests_passed=1
)


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[TestHub]:
    async with TestHub.in_process(make_config(database_url, validation_max_wait=20)) as test_hub:
        yield test_hub


async def validated(client: HubClient, artifact_id: str) -> pb.ArtifactValidated:
    async def wait() -> pb.ArtifactValidated:
        async for item in client.events():
            if (
                isinstance(item, pb.HubEvent)
                and item.HasField("artifact_validated")
                and item.artifact_validated.artifact_id == artifact_id
            ):
                return item.artifact_validated
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(wait(), timeout=20)


async def test_a_verdict_reaches_the_record_and_the_contributor(hub: TestHub) -> None:
    sharer = await hub.issue_token("sharer")
    validator = await hub.issue_token("v1", role=Role.VALIDATOR)
    stub = async_stub(hub.channel())
    async with HubClient(hub.target, "sharer", sharer, specialization=NET) as client:
        component = code_component()
        component.test_entry_points.append("ring_size")
        receipt = await client.share_code_component(component)
        claim = await stub.ClaimValidation(
            pb.ClaimValidationRequest(wait_seconds=5), metadata=auth(validator), timeout=15
        )
        lease = claim.lease
        assert lease.artifact.artifact_id == receipt.resource_id
        assert list(lease.artifact.code_component.test_entry_points) == ["ring_size"]
        answer = await stub.SubmitVerdict(
            pb.SubmitVerdictRequest(lease_id=lease.lease_id, verdict=PASSED),
            metadata=auth(validator),
        )
        event = await validated(client, receipt.resource_id)
    assert event.contributor_id == "sharer" and event.verdict.validator_id == "v1"
    assert answer.artifact_id == receipt.resource_id and answer.seq
    got = await stub.GetArtifact(
        pb.GetArtifactRequest(artifact_id=receipt.resource_id), metadata=auth(sharer)
    )
    assert got.artifact.validation_state == pb.VALIDATION_STATE_PASSED
    assert got.artifact.verdict.tests_passed == 1
    listed = await stub.ListArtifacts(
        pb.ListArtifactsRequest(validation_state=pb.VALIDATION_STATE_PASSED), metadata=auth(sharer)
    )
    assert [a.artifact_id for a in listed.artifacts] == [receipt.resource_id]
    stats = await stub.GetHubStats(pb.GetHubStatsRequest(), metadata=auth(sharer))
    assert stats.validation_pass_rate == 1.0
    assert stats.artifacts_by_validation_state["VALIDATION_STATE_PASSED"] == 1


async def test_a_waiting_claim_is_woken_by_a_share(hub: TestHub) -> None:
    sharer = await hub.issue_token("sharer")
    validator = await hub.issue_token("v1", role=Role.VALIDATOR)
    stub = async_stub(hub.channel())
    # Waits (the queue is empty), then the share arrives: the same call gets it.
    claim = asyncio.ensure_future(
        stub.ClaimValidation(
            pb.ClaimValidationRequest(wait_seconds=20), metadata=auth(validator), timeout=30
        )
    )
    async with HubClient(hub.target, "sharer", sharer, specialization=NET) as client:
        receipt = await client.share_code_component(code_component())
        response = await asyncio.wait_for(claim, 30)
    assert response.lease.artifact.artifact_id == receipt.resource_id
    # Nothing else waits: a claim without a wait answers at once, with no lease.
    empty = await stub.ClaimValidation(pb.ClaimValidationRequest(), metadata=auth(validator))
    assert not empty.HasField("lease")


async def test_roles_and_bad_requests_are_refused_clearly(hub: TestHub) -> None:
    agent = await hub.issue_token("sharer")
    validator = await hub.issue_token("v1", role=Role.VALIDATOR)
    other = await hub.issue_token("v2", role=Role.VALIDATOR)
    stub = async_stub(hub.channel())
    request = pb.SubmitVerdictRequest(lease_id="art_x:1:00", verdict=PASSED)
    for call in (
        stub.SubmitVerdict(request, metadata=auth(agent)),
        stub.ClaimValidation(pb.ClaimValidationRequest(), metadata=auth(agent)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'agent'" in (refused.value.details() or "")
    bad = pb.SubmitVerdictRequest(
        lease_id="art_x:1:00",
        verdict=pb.ValidationVerdict(
            state=pb.VALIDATION_STATE_PENDING, line_coverage=1.5, tests_run=1, tests_passed=2
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.SubmitVerdict(bad, metadata=auth(validator))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for field in ("verdict.state", "verdict.line_coverage", "verdict.tests_passed"):
        assert field in (invalid.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await stub.ClaimValidation(
            pb.ClaimValidationRequest(wait_seconds=3600), metadata=auth(validator)
        )
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wait_seconds" in (too_long.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.SubmitVerdict(request, metadata=auth(validator))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    # Someone else's lease.
    async with HubClient(hub.target, "sharer", agent, specialization=NET) as client:
        await client.share_code_component(code_component())
    lease = (
        await stub.ClaimValidation(
            pb.ClaimValidationRequest(wait_seconds=5), metadata=auth(validator)
        )
    ).lease
    with pytest.raises(grpc.aio.AioRpcError) as stolen:
        await stub.SubmitVerdict(
            pb.SubmitVerdictRequest(lease_id=lease.lease_id, verdict=PASSED),
            metadata=auth(other),
        )
    assert stolen.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An entry point that is not a C identifier never reaches a validator.
    async with HubClient(hub.target, "sharer", agent, specialization=NET) as client:
        component = code_component("c2")
        component.test_entry_points.append('x(); system("rm -rf /"); int y')
        with pytest.raises(Exception, match="test_entry_points"):
            await client.share_code_component(component)


async def test_an_expired_lease_is_refused_and_the_component_goes_to_another(
    database_url: str,
) -> None:
    config = make_config(database_url, validation_lease_ttl=0.2)
    async with TestHub.in_process(config) as hub:
        sharer = await hub.issue_token("sharer")
        slow = await hub.issue_token("slow", role=Role.VALIDATOR)
        quick = await hub.issue_token("quick", role=Role.VALIDATOR)
        stub = async_stub(hub.channel())
        async with HubClient(hub.target, "sharer", sharer, specialization=NET) as client:
            await client.share_code_component(code_component())
        first = (
            await stub.ClaimValidation(
                pb.ClaimValidationRequest(wait_seconds=5), metadata=auth(slow)
            )
        ).lease
        # The second validator's claim waits until the first lease expires, then gets it.
        second = (
            await stub.ClaimValidation(
                pb.ClaimValidationRequest(wait_seconds=10), metadata=auth(quick), timeout=20
            )
        ).lease
        assert second.artifact.artifact_id == first.artifact.artifact_id
        assert second.attempt == 2
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.SubmitVerdict(
                pb.SubmitVerdictRequest(lease_id=first.lease_id, verdict=PASSED),
                metadata=auth(slow),
            )
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "leased again" in (late.value.details() or "")


async def test_pending_validations_survive_a_hub_restart(tmp_path: Path) -> None:
    config = make_config(f"sqlite:///{tmp_path / 'hub.db'}")
    hub = TestHub.in_process(config)
    async with hub:
        sharer = await hub.issue_token("sharer")
        validator = await hub.issue_token("v1", role=Role.VALIDATOR)
        async with HubClient(hub.target, "sharer", sharer, specialization=NET) as client:
            receipt = await client.share_code_component(code_component())
        await hub.stop()
        await hub.start()
        stub = async_stub(hub.channel())
        claim = await stub.ClaimValidation(
            pb.ClaimValidationRequest(wait_seconds=5), metadata=auth(validator)
        )
        assert claim.lease.artifact.artifact_id == receipt.resource_id


async def test_the_validator_refuses_to_start_without_its_sandbox(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("unused")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "validator_service",
        "run",
        "--token-file",
        str(token_file),
        "--bwrap",
        str(tmp_path / "no-bwrap"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    message = err.decode()
    assert "cannot start" in message and "no-bwrap" in message and "--no-sandbox" in message


async def test_kernelhub_validator_run_validates_and_reports(hub: TestHub, tmp_path: Path) -> None:
    sharer = await hub.issue_token("sharer")
    token_file = tmp_path / "validator.token"
    token_file.write_text(await hub.issue_token("v1", role=Role.VALIDATOR))
    async with HubClient(hub.target, "sharer", sharer, specialization=NET) as client:
        component = code_component(code="int ring_size(void) { return 0; }\n")
        component.test_entry_points.append("ring_size")
        receipt = await client.share_code_component(component)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "validator_service",
            "run",
            "--hub",
            hub.target,
            "--token-file",
            str(token_file),
            "--count",
            "1",
            "--name",
            "cli_validator",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        assert "cli_validator: 1 validated {'VALIDATION_STATE_PASSED': 1}" in out.decode()
        event = await validated(client, receipt.resource_id)
    assert event.verdict.sandboxed and event.verdict.line_coverage == 1.0

"""Token roles: each role calls what its table allows, and a refusal names the role."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import roles
from hub_service.roles import Role

from .conftest import WAIT, HubHarness, auth

QUERIES = {
    "ListAgents": pb.ListAgentsRequest(),
    "ListArtifacts": pb.ListArtifactsRequest(),
    "GetArtifact": pb.GetArtifactRequest(artifact_id="art_missing"),
    "ListCollaborations": pb.ListCollaborationsRequest(),
    "ListFeatureRequests": pb.ListFeatureRequestsRequest(),
    "GetHubStats": pb.GetHubStatsRequest(),
}


@pytest.mark.parametrize("role", [Role.OBSERVER, Role.ADMIN, Role.VALIDATOR])
async def test_a_token_without_the_agent_role_may_query_but_not_connect(
    harness: HubHarness, role: Role
) -> None:
    token = await harness.token(f"{role.value}_1", role=role)
    for method, request in QUERIES.items():
        try:
            await getattr(harness.stub, method)(request, metadata=auth(token), timeout=WAIT)
        except grpc.aio.AioRpcError as error:  # only GetArtifact of a missing id may fail
            assert (method, error.code()) == ("GetArtifact", grpc.StatusCode.NOT_FOUND), error

    # Refused as the stream opens, before any message is read, so nothing is written (a
    # write racing the refusal would fail on the client's side, as INTERNAL).
    call = harness.stub.Connect(metadata=auth(token), timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"role {role.value!r}" in str(refused.value.details()), refused.value.details()
    assert "Connect" in str(refused.value.details())


async def test_an_agent_token_connects_and_queries(harness: HubHarness) -> None:
    trainer = await harness.connect("AI_Node_1")
    assert trainer.welcome.agent_id == "AI_Node_1"
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest(), agent_id="AI_Node_1")
    assert stats.agents_online == 1
    trainer.call.cancel()


def test_every_rpc_of_the_service_is_granted_to_some_role_and_only_those_exist() -> None:
    """The table fails closed, so an RPC missing from it would be refused to everyone."""
    service = pb.DESCRIPTOR.services_by_name["HubService"]
    methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
    granted = set().union(*roles.ALLOWED_METHODS.values())
    assert granted == methods


def test_the_contract_names_the_same_roles() -> None:
    names = set(pb.Role.DESCRIPTOR.values_by_name) - {"ROLE_UNSPECIFIED"}
    assert names == {f"ROLE_{role.name}" for role in Role}


async def test_token_issue_takes_a_role_and_list_shows_it(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"

    async def cli(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub_service",
            "token",
            *args,
            "--db",
            str(db),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("KERNELHUB_")},
        )
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    code, out, err = await cli("issue", "dash", "--role", "observer")
    assert code == 0, err
    code, out, err = await cli("issue", "AI_Node_1")
    assert code == 0, err
    code, out, err = await cli("list")
    assert code == 0, err
    rows = {line.split()[1]: line.split()[2] for line in out.splitlines()[1:]}
    assert rows == {"dash": "observer", "AI_Node_1": "agent"}
    code, out, err = await cli("issue", "x", "--role", "root")
    assert code == 2 and "invalid choice" in err and "observer" in err

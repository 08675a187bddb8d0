"""The admin RPCs (IssueToken, ListTokens, RevokeToken): admin tokens only; the secret is
shown once and never listed; and an observer can change nothing."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role

from .conftest import WAIT, HubHarness, auth

ADMIN_CALLS: dict[str, Any] = {
    "IssueToken": pb.IssueTokenRequest(agent_id="intruder", role=pb.ROLE_ADMIN),
    "ListTokens": pb.ListTokensRequest(),
    "RevokeToken": pb.RevokeTokenRequest(token_or_agent_id="ops"),
}


async def call(harness: HubHarness, token: str, method: str, request: Any) -> Any:
    return await getattr(harness.stub, method)(request, metadata=auth(token), timeout=WAIT)


async def refused(
    harness: HubHarness, token: str, method: str, request: Any
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(harness, token, method, request)
    return error.value


async def test_an_admin_issues_lists_and_revokes_tokens(harness: HubHarness) -> None:
    admin = await harness.token("ops", role=Role.ADMIN)
    issued = await call(
        harness,
        admin,
        "IssueToken",
        pb.IssueTokenRequest(agent_id="dash", role=pb.ROLE_OBSERVER, ttl_seconds=3600),
    )
    assert issued.secret.startswith("kh_")
    assert issued.token.role == pb.ROLE_OBSERVER and issued.token.agent_id == "dash"
    assert issued.token.HasField("create_time") and issued.token.HasField("expire_time")
    # The secret works, with the role it was given.
    stats = await call(harness, issued.secret, "GetHubStats", pb.GetHubStatsRequest())
    assert stats.hub_version
    error = await refused(harness, issued.secret, "ListTokens", pb.ListTokensRequest())
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    agent = await call(harness, admin, "IssueToken", pb.IssueTokenRequest(agent_id="AI_Node_9"))
    assert agent.token.role == pb.ROLE_AGENT and not agent.token.HasField("expire_time")
    for i in range(3):
        await call(harness, admin, "IssueToken", pb.IssueTokenRequest(agent_id=f"AI_Node_{i}"))

    # Paged, every token once, and nothing secret on the wire.
    seen: list[pb.TokenInfo] = []
    page_token, pages = "", 0
    while True:
        page = await call(
            harness, admin, "ListTokens", pb.ListTokensRequest(page_size=2, page_token=page_token)
        )
        pages += 1
        seen += page.tokens
        wire = page.SerializeToString()
        assert issued.secret.encode() not in wire and admin.encode() not in wire
        if not (page_token := page.next_page_token):
            break
    assert pages == 3
    assert sorted(t.agent_id for t in seen) == sorted(
        ["ops", "dash", "AI_Node_9", "AI_Node_0", "AI_Node_1", "AI_Node_2"]
    )

    revoked = await call(
        harness,
        admin,
        "RevokeToken",
        pb.RevokeTokenRequest(token_or_agent_id=issued.token.token_id),
    )
    assert revoked.revoked_count == 1
    error = await refused(harness, issued.secret, "GetHubStats", pb.GetHubStatsRequest())
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    by_agent = await call(
        harness, admin, "RevokeToken", pb.RevokeTokenRequest(token_or_agent_id="AI_Node_1")
    )
    assert by_agent.revoked_count == 1
    again = await call(
        harness, admin, "RevokeToken", pb.RevokeTokenRequest(token_or_agent_id="AI_Node_1")
    )
    assert again.revoked_count == 0
    listed = await call(harness, admin, "ListTokens", pb.ListTokensRequest(page_size=500))
    revoked_ids = {t.agent_id for t in listed.tokens if t.HasField("revoke_time")}
    assert revoked_ids == {"dash", "AI_Node_1"}


@pytest.mark.parametrize(
    ("method", "request_message", "fields"),
    [
        ("IssueToken", pb.IssueTokenRequest(), {"agent_id"}),
        (
            "IssueToken",
            pb.IssueTokenRequest(agent_id="x", role=99, ttl_seconds=-1),  # type: ignore[arg-type]
            {"role", "ttl_seconds"},
        ),
        ("IssueToken", pb.IssueTokenRequest(agent_id="<script>"), {"agent_id"}),
        ("ListTokens", pb.ListTokensRequest(page_size=-1), {"page_size"}),
        ("ListTokens", pb.ListTokensRequest(page_token="%%"), {"page_token"}),
        ("RevokeToken", pb.RevokeTokenRequest(), {"token_or_agent_id"}),
    ],
)
async def test_bad_admin_arguments_name_their_fields(
    harness: HubHarness, method: str, request_message: Any, fields: set[str]
) -> None:
    error = await refused(
        harness, await harness.token("ops", role=Role.ADMIN), method, request_message
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert {v.field for v in bad.field_violations} == fields


@pytest.mark.parametrize("role", [Role.AGENT, Role.OBSERVER, Role.VALIDATOR])
async def test_admin_rpcs_need_the_admin_role(harness: HubHarness, role: Role) -> None:
    token = await harness.token(f"{role.value}_1", role=role)
    await harness.token("ops", role=Role.ADMIN)
    for method, request in ADMIN_CALLS.items():
        error = await refused(harness, token, method, request)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
        assert f"role {role.value!r}" in str(error.details()) and method in str(error.details())
    # Nothing was issued or revoked.
    listed = await harness.server.store.list_tokens()
    assert {r.agent_id for r in listed} == {f"{role.value}_1", "ops"}
    assert all(r.revoked_at is None for r in listed)


async def test_an_observer_changes_nothing(harness: HubHarness) -> None:
    """Every mutating path: the Connect stream and the admin RPCs. The log, the agents and the
    tokens are as they were."""
    token = await harness.token("dash", role=Role.OBSERVER)
    before = await harness.query("GetHubStats", pb.GetHubStatsRequest(), agent_id="dash")
    # The whole stream is refused when it opens, before any message is read, so no message
    # kind can reach the hub; nothing is written (a write racing the refusal would fail on
    # the client's side, as INTERNAL, whatever the hub answered).
    stream = harness.stub.Connect(metadata=auth(token), timeout=WAIT)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream.read()
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role 'observer'" in str(error.value.details())
    for method, request in ADMIN_CALLS.items():
        assert (await refused(harness, token, method, request)).code() == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    after = await harness.query("GetHubStats", pb.GetHubStatsRequest(), agent_id="dash")
    assert (after.head_seq, after.agents_known) == (before.head_seq, before.agents_known)
    assert {r.agent_id for r in await harness.server.store.list_tokens()} == {"dash"}

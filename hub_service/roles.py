"""Token roles and what each may call: one table, checked by the auth interceptor.

Fail closed: an RPC this table does not name is refused to every role, so a new RPC must be
granted here explicitly.
"""

from __future__ import annotations

from enum import StrEnum

from generated.kernelhub.v1 import hub_pb2 as pb


class Role(StrEnum):
    """A token's role, stored with its hash (`kernelhub-hub token issue --role`)."""

    AGENT = "agent"
    """A trainer: the Connect stream and the query RPCs. The default."""
    OBSERVER = "observer"
    """A person or tool that watches (the dashboard): the query RPCs and Watch, nothing that
    changes state."""
    ADMIN = "admin"
    """An operator's tool: what an observer may, and managing tokens (the admin RPCs)."""
    VALIDATOR = "validator"
    """Builds and tests shared components: the query RPCs, ClaimValidation and SubmitVerdict;
    shares nothing."""


SERVICE = "/kernelhub.v1.HubService/"
QUERY_METHODS = frozenset(
    SERVICE + name
    for name in (
        "ListAgents",
        "ListArtifacts",
        "GetArtifact",
        "ListCollaborations",
        "ListFeatureRequests",
        "GetHubStats",
    )
)
WATCH_METHODS = QUERY_METHODS | {SERVICE + "Watch"}
ADMIN_METHODS = frozenset(SERVICE + name for name in ("IssueToken", "ListTokens", "RevokeToken"))
ALLOWED_METHODS: dict[Role, frozenset[str]] = {
    Role.AGENT: QUERY_METHODS | {SERVICE + "Connect"},
    Role.OBSERVER: WATCH_METHODS,
    Role.ADMIN: WATCH_METHODS | ADMIN_METHODS,
    Role.VALIDATOR: QUERY_METHODS | {SERVICE + "ClaimValidation", SERVICE + "SubmitVerdict"},
}


def may_call(role: Role, method: str) -> bool:
    return method in ALLOWED_METHODS[role]


def refusal(role: Role, method: str) -> str:
    """The PERMISSION_DENIED message: names the role, so the caller knows which token to use."""
    return f"a token with role {role.value!r} may not call {method.rsplit('/', 1)[-1]}"


def to_pb(role: Role) -> pb.Role.ValueType:
    return pb.Role.Value(f"ROLE_{role.name}")


def from_pb(value: int) -> Role:
    """The role a contract value names (ROLE_UNSPECIFIED: the default, agent); ValueError
    for a number the contract does not define."""
    if value == pb.ROLE_UNSPECIFIED:
        return Role.AGENT
    return Role[pb.Role.Name(value).removeprefix("ROLE_")]  # type: ignore[arg-type]

"""The admin RPCs: tokens issued, listed and revoked over gRPC, so operators need not touch
the database. Transport-agnostic, like the queries: a StatusError says what went wrong."""

from __future__ import annotations

from datetime import timedelta

from generated.kernelhub.v1 import hub_pb2 as pb

from . import paging, roles
from .errors import invalid
from .state import HubStore

MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


class Admin:
    def __init__(self, store: HubStore, budget: int) -> None:
        self._store = store
        self._budget = budget

    async def issue_token(self, request: pb.IssueTokenRequest) -> pb.IssueTokenResponse:
        violations: list[tuple[str, str]] = []
        if not request.agent_id:
            violations.append(("agent_id", "is required"))
        try:
            role = roles.from_pb(request.role)
        except ValueError:
            violations.append(("role", f"{request.role} is not a known Role"))
        if not 0 <= request.ttl_seconds <= MAX_TTL_SECONDS:
            violations.append(
                ("ttl_seconds", f"must be 0 to {MAX_TTL_SECONDS}, got {request.ttl_seconds}")
            )
        if violations:
            raise invalid(violations)
        ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else None
        issued = await self._store.issue_token(request.agent_id, ttl, role)
        info = pb.TokenInfo(
            token_id=issued.token_id, agent_id=issued.agent_id, role=roles.to_pb(issued.role)
        )
        if issued.created_at is not None:
            info.create_time.FromDatetime(issued.created_at)
        if issued.expires_at is not None:
            info.expire_time.FromDatetime(issued.expires_at)
        return pb.IssueTokenResponse(token=info, secret=issued.token)

    async def list_tokens(self, request: pb.ListTokensRequest) -> pb.ListTokensResponse:
        limit = paging.page_size(request.page_size)
        page = await self._store.list_tokens_page(
            limit, paging.decode(request.page_token), self._budget
        )
        token = paging.encode(page.next_cursor) if page.next_cursor else ""
        return pb.ListTokensResponse(tokens=page.items, next_page_token=token)

    async def revoke_token(self, request: pb.RevokeTokenRequest) -> pb.RevokeTokenResponse:
        if not request.token_or_agent_id:
            raise invalid([("token_or_agent_id", "is required")])
        count = await self._store.revoke_tokens(request.token_or_agent_id)
        return pb.RevokeTokenResponse(revoked_count=count)

"""HubService over gRPC: each RPC delegates to the session, the watches, the syncs, the
queries or the admin handlers.

Thin on purpose (Flower's servicer over a transport-agnostic handler): what is grpc here
is the context and how a StatusError becomes a status; the work is elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from . import auth, paging
from .admin import Admin
from .committer import GroupCommitter
from .config import HubConfig
from .errors import StatusError
from .lingers import Linger
from .metrics import HubMetrics
from .queries import Queries
from .retention import Retention
from .roles import SERVICE
from .router import Router
from .session import Context, Sessions
from .state import HubStore
from .training_sync import TrainingSyncs
from .verdicts import Verdicts
from .watch import Watches

Query = TypeVar("Query")
Answer = TypeVar("Answer")


def _rich_errors(
    method: Callable[[HubServicer, Query, Context], Awaitable[Answer]],
) -> Callable[[HubServicer, Query, Context], Awaitable[Answer]]:
    """Answer a StatusError with a rich status (BadRequest details that grpcurl prints)."""

    @functools.wraps(method)
    async def wrapper(self: HubServicer, request: Query, context: Context) -> Answer:
        try:
            return await method(self, request, context)
        except StatusError as error:
            self.metrics.rpc_error(SERVICE + method.__name__, error.code)
            await context.abort_with_status(error.to_status())
            raise  # abort_with_status raises; this keeps type checkers informed

    return wrapper


class HubServicer(hub_pb2_grpc.HubServiceServicer):
    def __init__(
        self,
        config: HubConfig,
        store: HubStore,
        committer: GroupCommitter,
        router: Router,
        metrics: HubMetrics,
        retention: Retention,
        stream_linger: Linger,
    ) -> None:
        self.metrics = metrics
        # What the items of one response may take: every response is built to fit.
        budget = paging.budget(config.max_message_bytes)
        self.syncs = TrainingSyncs(store, router, budget)
        self.sessions = Sessions(
            config, store, committer, router, self.syncs, retention, budget, metrics, stream_linger
        )
        self.queries = Queries(store, router, retention, budget, committer)
        self.watches = Watches(config, store, router, retention, budget, metrics, stream_linger)
        self.admin = Admin(store, budget)
        self.verdicts = Verdicts(config, committer)

    async def Connect(  # type: ignore[override]  # answers through context.write
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> None:
        await self.sessions.serve(request_iterator, context)

    async def broadcast_training_sync(self) -> None:
        await self.syncs.broadcast()

    async def drain(self, timeout: float) -> None:
        self.watches.drain()
        await self.sessions.drain(timeout)

    @_rich_errors
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        return await self.queries.list_agents(request)

    @_rich_errors
    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: Context
    ) -> pb.ListArtifactsResponse:
        return await self.queries.list_artifacts(request)

    @_rich_errors
    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Context
    ) -> pb.GetArtifactResponse:
        return await self.queries.get_artifact(request)

    @_rich_errors
    async def ListCollaborations(
        self, request: pb.ListCollaborationsRequest, context: Context
    ) -> pb.ListCollaborationsResponse:
        return await self.queries.list_collaborations(request)

    @_rich_errors
    async def ListFeatureRequests(
        self, request: pb.ListFeatureRequestsRequest, context: Context
    ) -> pb.ListFeatureRequestsResponse:
        return await self.queries.list_feature_requests(request)

    @_rich_errors
    async def GetHubStats(
        self, request: pb.GetHubStatsRequest, context: Context
    ) -> pb.GetHubStatsResponse:
        return await self.queries.hub_stats(request)

    @_rich_errors
    async def Watch(  # type: ignore[override]  # answers through context.write
        self, request: pb.WatchRequest, context: Context
    ) -> None:
        await self.watches.serve(request, context)

    @_rich_errors
    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: Context
    ) -> pb.IssueTokenResponse:
        return await self.admin.issue_token(request)

    @_rich_errors
    async def ListTokens(
        self, request: pb.ListTokensRequest, context: Context
    ) -> pb.ListTokensResponse:
        return await self.admin.list_tokens(request)

    @_rich_errors
    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Context
    ) -> pb.RevokeTokenResponse:
        return await self.admin.revoke_token(request)

    @_rich_errors
    async def ClaimValidation(
        self, request: pb.ClaimValidationRequest, context: Context
    ) -> pb.ClaimValidationResponse:
        return await self.verdicts.claim(auth.current_agent(), request)

    @_rich_errors
    async def SubmitVerdict(
        self, request: pb.SubmitVerdictRequest, context: Context
    ) -> pb.SubmitVerdictResponse:
        return await self.verdicts.submit(auth.current_agent(), request)

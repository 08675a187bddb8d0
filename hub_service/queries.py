"""The query RPCs over the store: arguments checked, pages sized and bounded in bytes,
answers built. Transport-agnostic: a StatusError says what went wrong, the servicer sends it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from generated.kernelhub.v1 import hub_pb2 as pb

from . import __version__, paging
from .committer import GroupCommitter
from .errors import invalid, not_found
from .retention import Retention
from .router import Router
from .state import HubStore, Page
from .training_sync import knowledge_base

# A page of the store: (limit, cursor, max_bytes) -> Page.
Fetch = Callable[[int, str, int], Awaitable[Page]]


class Queries:
    def __init__(
        self,
        store: HubStore,
        router: Router,
        retention: Retention,
        budget: int,
        committer: GroupCommitter,
    ) -> None:
        self._store = store
        self._committer = committer  # its queue depth and latest commit time (GetHubStats)
        self._router = router
        self._retention = retention
        self._budget = budget  # what the items of one response may take
        self._start_time = Timestamp()
        self._start_time.GetCurrentTime()  # made as the hub starts (GetHubStats.start_time)

    async def _page(
        self, page_size: int, page_token: str, fetch: Fetch, *, numeric: bool = True
    ) -> tuple[list[Any], str]:
        """The one paging path of every List: size, token in, byte budget, token out.
        `numeric`: the store's cursor for this list is an offset or seq."""
        limit = paging.page_size(page_size)
        token = paging.decode_int(page_token) if numeric else paging.decode(page_token)
        cursor = str(token or "")
        page = await fetch(limit, cursor, self._budget)
        return page.items, paging.encode(page.next_cursor) if page.next_cursor else ""

    async def list_agents(self, request: pb.ListAgentsRequest) -> pb.ListAgentsResponse:
        items, token = await self._page(
            request.page_size,
            request.page_token,
            lambda limit, cursor, budget: self._store.list_agents(
                request.online_only, limit, cursor, budget
            ),
        )
        return pb.ListAgentsResponse(agents=items, next_page_token=token)

    async def list_artifacts(self, request: pb.ListArtifactsRequest) -> pb.ListArtifactsResponse:
        _check_enum("kind", request.kind, pb.ArtifactKind)
        _check_enum("specialization", request.specialization, pb.Specialization)
        _check_enum("validation_state", request.validation_state, pb.ValidationState)
        items, token = await self._page(
            request.page_size,
            request.page_token,
            lambda limit, cursor, budget: self._store.list_artifacts(
                request.kind,
                request.specialization,
                request.contributor_id,
                limit,
                cursor,
                budget,
                request.validation_state,
            ),
        )
        return pb.ListArtifactsResponse(artifacts=items, next_page_token=token)

    async def get_artifact(self, request: pb.GetArtifactRequest) -> pb.GetArtifactResponse:
        if not request.artifact_id:
            raise invalid([("artifact_id", "is required")])
        artifact = await self._store.get_artifact(request.artifact_id)
        if artifact is None:
            raise not_found(f"artifact {request.artifact_id}")
        if (size := artifact.ByteSize()) > self._budget:
            raise paging.too_large(f"artifact {request.artifact_id}", size, self._budget)
        return pb.GetArtifactResponse(artifact=artifact)

    async def list_collaborations(
        self, request: pb.ListCollaborationsRequest
    ) -> pb.ListCollaborationsResponse:
        _check_enum("state", request.state, pb.CollaborationState)
        items, token = await self._page(
            request.page_size,
            request.page_token,
            lambda limit, cursor, budget: self._store.list_collaborations(
                request.agent_id, request.state, limit, cursor, budget
            ),
            numeric=False,
        )
        return pb.ListCollaborationsResponse(collaborations=items, next_page_token=token)

    async def list_feature_requests(
        self, request: pb.ListFeatureRequestsRequest
    ) -> pb.ListFeatureRequestsResponse:
        items, token = await self._page(
            request.page_size,
            request.page_token,
            lambda limit, cursor, budget: self._store.list_feature_requests(
                request.requester_id, limit, cursor, budget
            ),
        )
        return pb.ListFeatureRequestsResponse(feature_requests=items, next_page_token=token)

    async def hub_stats(self, request: pb.GetHubStatsRequest) -> pb.GetHubStatsResponse:
        stats = await self._store.stats()
        stats.agents_online = len(self._router)
        stats.watch_streams = self._router.watch_count
        stats.hub_version = __version__
        stats.start_time.CopyFrom(self._start_time)
        stats.oldest_seq = self._retention.oldest_seq
        stats.idempotency_window_seconds = self._retention.policy.ledger_max_age
        stats.commit_queue_depth = self._committer.queued()
        stats.last_commit_seconds = self._committer.last_commit_seconds
        judged = stats.artifacts_by_validation_state
        passed = judged.get(pb.ValidationState.Name(pb.VALIDATION_STATE_PASSED), 0)
        failed = sum(
            judged.get(pb.ValidationState.Name(state), 0)
            for state in (pb.VALIDATION_STATE_FAILED, pb.VALIDATION_STATE_TIMED_OUT)
        )
        stats.validation_pass_rate = passed / (passed + failed) if passed + failed else 0.0
        # The store's stats count the knowledge base; the newest artifacts come beside them,
        # as many as fit (64: the summary's counts and tags).
        stats.ClearField("knowledge_base")
        kb = await knowledge_base(self._store)
        kb.fit_into(stats.knowledge_base, self._budget - stats.ByteSize() - 64)
        return stats


def _check_enum(field: str, value: int, enum_type: Any) -> None:
    if value not in enum_type.DESCRIPTOR.values_by_number:
        raise invalid([(field, f"{value} is not a known {enum_type.DESCRIPTOR.name}")])

"""The dashboard's side of the hub: one Watch stream (resumed by seq after any break), the
online agents listed once per (re)connect and then kept by the stream's presence events, and
a poll of GetHubStats, fed into the `Aggregate`; and the lookups the agent and artifact pages
make. Every call has a deadline; the Watch reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

from .aggregate import Aggregate, artifact_label, to_json

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
POLL_SECONDS = 2.0
REPLAY_EVENTS = 5000  # a new dashboard replays this many recent events to fill its charts
MAX_ONLINE = 20_000  # agents the poll pages through at most
BACKOFF = (0.2, 5.0)


class HubFeed:
    def __init__(self, target: str, token: str, aggregate: Aggregate) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._channel = grpc.aio.insecure_channel(target)
        self._stub: Any = hub_pb2_grpc.HubServiceStub(self._channel)
        self.aggregate = aggregate
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch()), asyncio.create_task(self._poll())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._channel.close(None)

    async def call(self, method: str, request: Any) -> Any:
        """One query RPC with the observer's token and a deadline."""
        return await getattr(self._stub, method)(
            request, metadata=self._metadata, timeout=CALL_TIMEOUT
        )

    async def _watch(self) -> None:
        delay = BACKOFF[0]
        after: int | None = None
        while True:
            try:
                # Who is online comes on the stream itself (its roster, then changes).
                head = (await self.call("GetHubStats", pb.GetHubStatsRequest())).head_seq
                if after is None:
                    after = max(0, head - REPLAY_EVENTS)
                elif after < head - REPLAY_EVENTS:
                    after = head - REPLAY_EVENTS  # long gone: skip what the charts no longer show
                stream = self._stub.Watch(pb.WatchRequest(after_seq=after), metadata=self._metadata)
                self.aggregate.watching = True
                self.aggregate.watch_error = ""
                async for response in stream:
                    delay = BACKOFF[0]
                    if response.HasField("presence"):
                        self.aggregate.presence(response.presence)
                    for event in response.events:
                        self.aggregate.event(event)
                        after = event.seq
            except grpc.aio.AioRpcError as error:
                self.aggregate.watch_error = f"{error.code().name}: {error.details()}"
                log.warning(
                    "watch ended: %s; retrying in %.1f s", self.aggregate.watch_error, delay
                )
            self.aggregate.watching = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF[1])

    async def _poll(self) -> None:
        while True:
            try:
                self.aggregate.stats(await self.call("GetHubStats", pb.GetHubStatsRequest()))
            except grpc.aio.AioRpcError as error:
                log.warning("poll failed: %s: %s", error.code().name, error.details())
            await asyncio.sleep(POLL_SECONDS)

    # --- the agent and artifact pages ---------------------------------------------------

    async def agent_page(
        self, agent_id: str, artifacts_token: str, collab_token: str
    ) -> dict[str, Any]:
        artifacts = await self.call(
            "ListArtifacts",
            pb.ListArtifactsRequest(
                contributor_id=agent_id, page_size=25, page_token=artifacts_token
            ),
        )
        collaborations = await self.call(
            "ListCollaborations",
            pb.ListCollaborationsRequest(agent_id=agent_id, page_size=25, page_token=collab_token),
        )
        return {
            "agent_id": agent_id,
            "agent": self.aggregate.online.get(agent_id),
            "artifacts": [_artifact_row(a) for a in artifacts.artifacts],
            "artifacts_next": artifacts.next_page_token,
            "collaborations": [to_json(c) for c in collaborations.collaborations],
            "collaborations_next": collaborations.next_page_token,
        }

    async def artifact(self, artifact_id: str) -> dict[str, Any]:
        return to_json(
            (
                await self.call("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id))
            ).artifact
        )


def _artifact_row(artifact: pb.Artifact) -> dict[str, Any]:
    return {
        "artifact_id": artifact.artifact_id,
        "kind": artifact.WhichOneof("content") or "",
        "label": artifact_label(artifact)[:200],
        "time": artifact.create_time.seconds,
    }

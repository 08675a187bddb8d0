"""Training syncs: who is online, whom to pair with, and the knowledge base, composed per
agent within one response's byte budget and broadcast every interval."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from generated.kernelhub.v1 import hub_pb2 as pb

from . import paging
from .complementarity import Candidate, complement, opportunities
from .connection import Connection
from .router import Router
from .state import HubStore

# Agents listed in a training sync, in all and per specialization (for opportunities).
ROSTER_SIZE = 32
# The newest artifacts a knowledge-base summary lists (as many as fit a response).
RECENT_ARTIFACTS = 5


@dataclass
class Roster:
    active: list[pb.AgentInfo] = field(default_factory=list)
    active_bytes: int = 0  # of `active`, as entries of a TrainingSync
    by_specialization: dict[int, list[Candidate]] = field(default_factory=dict)


@dataclass(frozen=True)
class KnowledgeBase:
    """The summary a sync round sends, with each recent artifact's size (measured once)."""

    summary: pb.KnowledgeBaseSummary
    sizes: list[int]

    def fit_into(self, summary: pb.KnowledgeBaseSummary, room: int) -> None:
        """Copy the counts and as many of the newest artifacts as `room` bytes hold."""
        if sum(self.sizes) <= room:
            summary.CopyFrom(self.summary)
            return
        for name in ("pattern", "code_component", "os_component", "feature_request"):
            setattr(summary, f"{name}_count", getattr(self.summary, f"{name}_count"))
        for artifact, size in zip(self.summary.recent_artifacts, self.sizes, strict=True):
            if size <= room:  # an artifact too large is left out, not the ones after it
                room -= size
                summary.recent_artifacts.append(artifact)


async def knowledge_base(store: HubStore) -> KnowledgeBase:
    summary = await store.knowledge_base(recent=RECENT_ARTIFACTS)
    return KnowledgeBase(summary, [paging.entry_bytes(a) for a in summary.recent_artifacts])


def _listing(c: Connection) -> tuple[pb.AgentInfo, int]:
    """`c`'s agent as a training sync lists it, and its size: built once per stream (every
    newcomer's sync lists the oldest agents), once its connect time is known."""
    if c.listing is not None:
        return c.listing
    info = pb.AgentInfo(
        agent_id=c.agent_id,
        specialization=c.hello.specialization,
        capabilities=c.hello.capabilities,
        version=c.hello.version,
        online=True,
    )
    if c.connected_time is not None:
        info.last_seen_time.CopyFrom(c.connected_time)
    listing = (info, paging.entry_bytes(info))
    if c.connected_time is not None:
        c.listing = listing  # final: kept
    return listing


class TrainingSyncs:
    """Composes each agent's sync from one roster and one knowledge base per round."""

    def __init__(self, store: HubStore, router: Router, budget: int) -> None:
        self._store = store
        self._router = router
        self._budget = budget
        # The knowledge base as of a log head, read once for it: it changes only with an
        # event (an artifact, a feature request, a verdict), so a storm of connects while
        # the head stands still costs one read, not one each.
        self._kb: tuple[int, asyncio.Future[KnowledgeBase]] | None = None

    async def knowledge_base(self) -> KnowledgeBase:
        head = self._router.last_published_seq
        cached = self._kb
        if (
            cached is None
            or cached[0] != head
            or self._router.in_doubt  # what landed unpublished may be in the summary
            or (cached[1].done() and (cached[1].cancelled() or cached[1].exception()))
        ):
            reading = asyncio.ensure_future(knowledge_base(self._store))
            # Retrieved here, so a read whose every waiter left logs no "never retrieved".
            reading.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._kb = cached = (head, reading)
        return await asyncio.shield(cached[1])

    def _roster(self) -> Roster:
        """Who is online, sampled once per sync round: at most ROSTER_SIZE agents in all and
        per specialization (from the router's index, so a sample costs its size, not the
        number of connections, and a connect storm does not cost O(connections^2)); and at
        most half a response of them, so the knowledge base has room beside them."""
        roster = Roster()
        for c in self._router.sample(ROSTER_SIZE):
            info, size = _listing(c)
            if roster.active_bytes + size <= self._budget // 2:
                roster.active.append(info)
                roster.active_bytes += size
        for kind, peers in self._router.sample_by_specialization(ROSTER_SIZE).items():
            roster.by_specialization[kind] = [c.candidate for c in peers]
        return roster

    async def compose(
        self,
        connection: Connection,
        kb: KnowledgeBase | None = None,
        roster: Roster | None = None,
    ) -> pb.TrainingSync:
        """What `connection`'s agent should know: who is active, whom to pair with, the KB;
        in one response's budget, with as many of the newest artifacts as fit."""
        kb = kb or await self.knowledge_base()
        roster = roster or self._roster()
        me, my_spec = connection.agent_id, connection.hello.specialization
        candidates = [
            c
            for spec, peers in roster.by_specialization.items()
            if complement(my_spec, spec) is not None
            for c in peers
        ]
        sync = pb.TrainingSync(
            active_agents=[a for a in roster.active if a.agent_id != me],
            opportunities=opportunities(me, my_spec, candidates),
        )
        sync.create_time.GetCurrentTime()
        # 64: the create time, the counts and the tags around them.
        room = (
            self._budget
            - roster.active_bytes
            - sum(paging.entry_bytes(o) for o in sync.opportunities)
            - 64
        )
        kb.fit_into(sync.knowledge_base, room)
        return sync

    async def broadcast(self) -> None:
        kb = await self.knowledge_base()
        roster = self._roster()
        for i, connection in enumerate(self._router.connections()):
            connection.send_sync(await self.compose(connection, kb, roster))
            if i % 100 == 99:
                await asyncio.sleep(0)  # let streams run between chunks of a big round

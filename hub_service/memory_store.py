"""The in-memory store: the whole `HubStore` contract in the hub's own memory, for an
ephemeral hub (`--database-url memory://`) and for tests. Nothing survives the process.

It runs on the event loop (no threads, no locks): a commit applies each command to a
`MemoryTx` that buffers its writes and merges them only if the command succeeds, so a
refused or failing command leaves nothing behind, as in the SQL store. It holds what the
SQL store's tables hold; every answer is bounded by the same page and byte limits.
"""

from __future__ import annotations

import bisect
import hmac
import logging
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import SQLModel

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from . import paging
from .commands import apply_command
from .errors import StatusError, unavailable
from .models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    TokenRow,
    ValidationJobRow,
    agent_to_proto,
    artifact_row,
    collaboration_to_proto,
    feature_request_to_proto,
    token_to_proto,
    utcnow,
)
from .outcomes import Outcome
from .roles import Role
from .state import (
    REPLAY_SCAN_SEQS,
    Command,
    EventPage,
    IssuedToken,
    Page,
    Principal,
    Receipt,
    decode_stored,
)
from .subscriptions import EVERYTHING, Filter, Tags
from .tokens import hash_token, issue

log = logging.getLogger(__name__)
R = TypeVar("R", bound=SQLModel)


@dataclass(frozen=True, slots=True)
class _Event:
    seq: int
    sender_id: str
    recipients: frozenset[str] | None  # None: every agent but the sender
    body: bytes
    created_at: datetime
    tags: Tags

    def entitles(self, agent_id: str, subscription: Filter) -> bool:
        if self.recipients is None:
            return (
                self.sender_id != agent_id and subscription.matches(self.tags)
            ) or agent_id in self.tags.also_to
        return agent_id in self.recipients


def _copy(row: R) -> R:
    """A row a command may change without touching the stored one until it succeeds."""
    return type(row)(**row.model_dump())


CountKey = tuple[str | None, str | None, int | None]


def _count_keys(row: CollaborationRow) -> tuple[CountKey, ...]:
    """The `count_open` criteria an open session counts towards (none if it is not open):
    the ones the domain rules ask, each counted without a scan."""
    if row.state not in collab.OPEN_STATES:
        return ()
    return (
        (row.initiator_id, None, None),
        (None, row.target_id, row.state),
        (row.initiator_id, row.target_id, None),
    )


class MemoryTx:
    """`StateTx` for one command: reads see the store and this command's own writes; the
    writes reach the store only through `merge`. Rows read are copies (an identity map,
    as a SQL session's), so a row read twice is the same object."""

    def __init__(self, store: MemoryStore, now: datetime, now_pb: Timestamp) -> None:
        self._store = store
        self.now = now
        self.now_pb = now_pb
        self.policy = store.policy
        self.origin = ""  # one process: no replica carries anything
        self._seq = store.head
        self._rows: dict[tuple[type[SQLModel], str], Any] = {}
        self._events: list[_Event] = []
        self.artifacts: list[ArtifactRow] = []
        self._deliveries: list[FeatureDeliveryRow] = []
        self._receipts: dict[tuple[str, str], Receipt] = {}

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def add_event(self, event: pb.HubEvent, recipients: frozenset[str] | None, tags: Tags) -> None:
        self._events.append(
            _Event(
                event.seq,
                event.sender_id,
                recipients,
                event.SerializeToString(),
                self.now,
                tags,
            )
        )

    def add_artifact(self, artifact: pb.Artifact, seq: int) -> None:
        self.artifacts.append(ArtifactRow(**artifact_row(artifact, seq, self.now)))

    def receipt(self, agent_id: str, message_id: str) -> Receipt | None:
        key = (agent_id, message_id)
        return self._receipts.get(key) or self._store.receipts.get(key)

    def remember(self, agent_id: str, message_id: str, receipt: Receipt) -> None:
        self._receipts[(agent_id, message_id)] = receipt

    # --- rows, through the identity map ---------------------------------------------

    def _get(self, kind: type[R], table: dict[str, R], key: str) -> R | None:
        if (kind, key) in self._rows:
            found: R = self._rows[(kind, key)]
            return found
        row = table.get(key)
        if row is None:
            return None
        self._rows[(kind, key)] = copy = _copy(row)
        return copy

    def _scan(self, kind: type[R], table: dict[str, R]) -> Iterator[tuple[str, R]]:
        """Every row as this command sees it (read-only: `_get` the ones to change)."""
        for key, row in table.items():
            yield key, self._rows.get((kind, key), row)
        for (k, key), row in self._rows.items():
            if k is kind and key not in table:
                yield key, row

    def _put(self, kind: type[SQLModel], key: str, row: SQLModel) -> None:
        self._rows[(kind, key)] = row

    def agent(self, agent_id: str) -> AgentRow | None:
        return self._get(AgentRow, self._store.agents, agent_id)

    def specialization_of(self, agent_id: str) -> int:
        row = self._rows.get((AgentRow, agent_id)) or self._store.agents.get(agent_id)
        return row.specialization if row is not None else 0

    def agents(self, online_only: bool = False) -> Sequence[AgentRow]:
        keys = [
            k
            for k, row in self._scan(AgentRow, self._store.agents)
            if row.online or not online_only
        ]
        return [row for k in keys if (row := self.agent(k)) is not None]

    def put_agent(self, row: AgentRow) -> None:
        # A presence change: the next revision (a refused command's is skipped, harmlessly).
        self._store.presence_rev += 1
        row.presence_rev = self._store.presence_rev
        self._put(AgentRow, row.agent_id, row)

    # One process, no replicas: no leases to expire.
    def expired_replicas(self) -> Sequence[str]:
        return ()

    def carried_by(self, replica_id: str, limit: int) -> Sequence[AgentRow]:
        return ()

    def drop_replica(self, replica_id: str) -> None:
        pass

    def orphaned(self, limit: int) -> Sequence[AgentRow]:
        return ()

    def replica_live(self, replica_id: str) -> bool:
        return True

    def collaboration(self, session_id: str) -> CollaborationRow | None:
        return self._get(CollaborationRow, self._store.collaborations, session_id)

    def _pending_collaborations(self) -> Iterator[CollaborationRow]:
        for (kind, _), row in self._rows.items():
            if kind is CollaborationRow:
                yield row

    def _open(self, session_ids: Iterable[str]) -> Iterator[tuple[str, CollaborationRow]]:
        """The open ones among `session_ids` (stored as open) and this command's own rows."""
        seen = set()
        for key in session_ids:
            row = self._rows.get((CollaborationRow, key)) or self._store.collaborations[key]
            seen.add(key)
            if row.state in collab.OPEN_STATES:
                yield key, row
        for row in self._pending_collaborations():
            if row.session_id not in seen and row.state in collab.OPEN_STATES:
                yield row.session_id, row

    def open_collaborations(self, agent_id: str | None) -> Sequence[CollaborationRow]:
        candidates = (
            self._store.open_by_agent.get(agent_id, ())
            if agent_id is not None
            else list(self._store.open_by_agent.get(None, ()))
        )
        keys = [
            key
            for key, row in self._open(list(candidates))
            if (row.expires_at is None or row.expires_at > self.now)
            and (agent_id is None or agent_id in (row.initiator_id, row.target_id))
        ]
        return [row for k in keys if (row := self.collaboration(k)) is not None]

    def count_open(
        self, *, initiator: str | None = None, target: str | None = None, state: int | None = None
    ) -> int:
        """From the store's counts of open sessions, corrected by this command's rows."""
        key = (initiator, target, state)
        count = self._store.open_counts[key]
        for row in self._pending_collaborations():
            stored = self._store.collaborations.get(row.session_id)
            if stored is not None and key in _count_keys(stored):
                count -= 1
            if key in _count_keys(row):
                count += 1
        return count

    def due_collaborations(self, limit: int) -> Sequence[CollaborationRow]:
        due = sorted(
            (row.expires_at, key)
            for key, row in self._open(list(self._store.open_by_agent.get(None, ())))
            if row.expires_at is not None and row.expires_at <= self.now
        )[:limit]
        return [row for _, k in due if (row := self.collaboration(k)) is not None]

    def put_collaboration(self, row: CollaborationRow) -> None:
        self._put(CollaborationRow, row.session_id, row)

    def feature_request(self, request_id: str) -> FeatureRequestRow | None:
        return self._get(FeatureRequestRow, self._store.requests, request_id)

    def put_feature_request(self, row: FeatureRequestRow) -> None:
        self._put(FeatureRequestRow, row.request_id, row)

    def delivery_by(self, request_id: str, deliverer_id: str) -> str | None:
        for row in self._deliveries:
            if (row.request_id, row.deliverer_id) == (request_id, deliverer_id):
                return row.artifact_id
        stored = self._store.deliveries.get((request_id, deliverer_id))
        return stored.artifact_id if stored else None

    def put_delivery(self, row: FeatureDeliveryRow) -> None:
        self._deliveries.append(row)

    # --- the validation queue -----------------------------------------------------

    def artifact(self, artifact_id: str) -> pb.Artifact | None:
        row = self._get(ArtifactRow, self._store.artifacts, artifact_id)
        return decode_stored(pb.Artifact, row.body) if row is not None else None

    def put_artifact(self, artifact: pb.Artifact) -> None:
        row = self._get(ArtifactRow, self._store.artifacts, artifact.artifact_id)
        assert row is not None, artifact.artifact_id  # only stored artifacts change
        row.body = artifact.SerializeToString()
        row.validation_state = artifact.validation_state

    def add_validation_job(self, row: ValidationJobRow) -> None:
        self._put(ValidationJobRow, row.artifact_id, row)

    def validation_job(self, artifact_id: str) -> ValidationJobRow | None:
        return self._get(ValidationJobRow, self._store.jobs, artifact_id)

    def put_validation_job(self, row: ValidationJobRow) -> None:
        self._put(ValidationJobRow, row.artifact_id, row)

    def claimable_jobs(self, limit: int) -> Sequence[ValidationJobRow]:
        """From the store's queue (ordered), as this command changed it."""
        found: list[ValidationJobRow] = []
        for available_at, _, artifact_id in self._store.waiting:
            if available_at > self.now or len(found) >= limit:
                break
            row = self.validation_job(artifact_id)
            if row is not None and not row.done and row.available_at <= self.now:
                found.append(row)
        return found

    def leases_held(self, validator_id: str) -> int:
        keys = set(self._store.held.get(validator_id, ())) | {
            key
            for (kind, key), row in self._rows.items()
            if kind is ValidationJobRow and row.validator_id == validator_id
        }
        return sum(
            1
            for key in keys
            if (row := self.validation_job(key)) is not None
            and row.validator_id == validator_id
            and not row.done
            and row.available_at > self.now
        )

    def next_available(self) -> datetime | None:
        times = [
            row.available_at
            for (kind, _), row in self._rows.items()
            if kind is ValidationJobRow and not row.done
        ]
        for available_at, _, artifact_id in self._store.waiting:
            if (ValidationJobRow, artifact_id) not in self._rows:
                times.append(available_at)
                break
        return min(times, default=None)

    def merge(self) -> None:
        """This command's writes, into the store (the command succeeded)."""
        self._store.absorb(
            self._seq,
            self._rows,
            self._events,
            self.artifacts,
            self._deliveries,
            self._receipts,
            self.now,
        )


class MemoryStore:
    """`HubStore` in memory. Tables are dicts; what is listed in order (events, artifacts,
    feature requests by seq; collaborations by session id) also has a sorted key list."""

    def __init__(self, policy: collab.Policy | None = None) -> None:
        self.policy = policy or collab.Policy()
        self.head = 0
        self.presence_rev = 0  # the agents' newest presence revision
        self.agents: dict[str, AgentRow] = {}
        self.collaborations: dict[str, CollaborationRow] = {}
        self._session_ids: list[str] = []  # sorted
        # Open sessions by partner (None: all of them), and their counts by `_count_keys`.
        self.open_by_agent: dict[str | None, set[str]] = {}
        self.open_counts: Counter[CountKey] = Counter()
        self.requests: dict[str, FeatureRequestRow] = {}
        self._request_seqs: list[tuple[int, str]] = []  # (seq, request_id), by seq
        self.deliveries: dict[tuple[str, str], FeatureDeliveryRow] = {}  # (request, deliverer)
        self.artifacts: dict[str, ArtifactRow] = {}
        self.jobs: dict[str, ValidationJobRow] = {}  # the validation queue, by artifact id
        self.waiting: list[tuple[datetime, int, str]] = []  # jobs not done, claimable order
        self.held: dict[str, set[str]] = {}  # validator -> its jobs not done (leases)
        self._artifact_seqs: list[tuple[int, str]] = []  # (seq, artifact_id), by seq
        self._kinds: Counter[int] = Counter()
        self._events: list[_Event] = []
        self._event_seqs: list[int] = []
        self.receipts: dict[tuple[str, str], Receipt] = {}
        # When each message id was remembered, oldest first (retention forgets from the left).
        self._ledger_times: deque[tuple[datetime, tuple[str, str]]] = deque()
        self._tokens: dict[str, TokenRow] = {}  # by token_id, in the order issued
        self._by_hash: dict[str, TokenRow] = {}
        self._closed = False

    async def open(self) -> None:
        self._closed = False

    async def close(self) -> None:
        self._closed = True

    # --- writes -------------------------------------------------------------------

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        """`HubStore.commit`: each command on its own `MemoryTx`, all at one time."""
        if self._closed:
            return [unavailable("the hub's store is closed")] * len(commands)
        now = utcnow()
        now_pb = Timestamp()
        now_pb.FromDatetime(now)
        results: list[Outcome | StatusError] = []
        for command in commands:
            tx = MemoryTx(self, now, now_pb)
            try:
                outcome = apply_command(tx, command)
            except StatusError as error:
                results.append(error)
                continue
            except Exception:
                log.exception("command %s failed", type(command).__name__)
                results.append(
                    StatusError(grpc.StatusCode.INTERNAL, "the hub failed to apply this message")
                )
                continue
            tx.merge()
            results.append(outcome)
        return results

    def absorb(
        self,
        head: int,
        rows: dict[tuple[type[SQLModel], str], Any],
        events: Iterable[_Event],
        artifacts: Iterable[ArtifactRow],
        deliveries: Iterable[FeatureDeliveryRow],
        receipts: dict[tuple[str, str], Receipt],
        now: datetime,
    ) -> None:
        """A succeeded command's writes (`MemoryTx.merge`): its seqs follow the head."""
        self.head = head
        for (kind, key), row in rows.items():
            if kind is AgentRow:
                self.agents[key] = row
            elif kind is CollaborationRow:
                self._index_collaboration(row)
            elif kind is FeatureRequestRow:
                if key not in self.requests:
                    self._request_seqs.append((row.seq, key))
                self.requests[key] = row
            elif kind is ArtifactRow:
                self.artifacts[key] = row
            elif kind is ValidationJobRow:
                self._index_job(row)
        for event in events:
            self._events.append(event)
            self._event_seqs.append(event.seq)
        for artifact in artifacts:
            self.artifacts[artifact.artifact_id] = artifact
            self._artifact_seqs.append((artifact.seq, artifact.artifact_id))
            self._kinds[artifact.kind] += 1
        for delivery in deliveries:
            self.deliveries[(delivery.request_id, delivery.deliverer_id)] = delivery
        self.receipts.update(receipts)
        self._ledger_times.extend((now, key) for key in receipts)

    def _index_job(self, row: ValidationJobRow) -> None:
        """The queue's order: jobs not done, by (available_at, seq)."""
        old = self.jobs.get(row.artifact_id)
        if old is not None and not old.done:
            self.waiting.remove((old.available_at, old.seq, old.artifact_id))
            self.held.get(old.validator_id, set()).discard(old.artifact_id)
        self.jobs[row.artifact_id] = row
        if not row.done:
            bisect.insort(self.waiting, (row.available_at, row.seq, row.artifact_id))
            if row.validator_id:
                self.held.setdefault(row.validator_id, set()).add(row.artifact_id)

    def _index_collaboration(self, row: CollaborationRow) -> None:
        key = row.session_id
        old = self.collaborations.get(key)
        if old is None:
            bisect.insort(self._session_ids, key)
        else:
            self.open_counts.subtract(_count_keys(old))
        self.collaborations[key] = row
        self.open_counts.update(_count_keys(row))
        for partner in (None, row.initiator_id, row.target_id):
            sessions = self.open_by_agent.setdefault(partner, set())
            if row.state in collab.OPEN_STATES:
                sessions.add(key)
            else:
                sessions.discard(key)

    # --- the event log --------------------------------------------------------------

    async def head_seq(self) -> int:
        return self.head

    async def events_for(
        self,
        agent_id: str,
        after_seq: int,
        limit: int,
        max_bytes: int | None = None,
        subscription: Filter = EVERYTHING,
        scan_seqs: int = REPLAY_SCAN_SEQS,
    ) -> EventPage:
        start = bisect.bisect_right(self._event_seqs, after_seq)
        end = bisect.bisect_right(self._event_seqs, after_seq + scan_seqs)
        entitled = (
            self._events[i].body
            for i in range(start, end)
            if self._events[i].entitles(agent_id, subscription)
        )
        page, more = paging.take(
            entitled, lambda body: decode_stored(pb.HubEvent, body), limit, max_bytes
        )
        events = EventPage(event for _, event in page)
        events.more = more
        if not more and end < len(self._events):
            events.more, events.through = True, after_seq + scan_seqs
        return events

    async def events_after(
        self, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        start = bisect.bisect_right(self._event_seqs, after_seq)
        bodies = (self._events[i].body for i in range(start, len(self._events)))
        page, more = paging.take(
            bodies, lambda body: decode_stored(pb.HubEvent, body), limit, max_bytes
        )
        events = EventPage(event for _, event in page)
        events.more = more
        return events

    # --- retention --------------------------------------------------------------------

    async def oldest_seq(self) -> int:
        return self._event_seqs[0] if self._event_seqs else 1

    async def prunable_through(
        self, through_seq: int, older_than: datetime | None, limit: int
    ) -> int:
        last = 0
        for event in self._events[:limit]:
            if event.seq > through_seq or (
                older_than is not None and event.created_at >= older_than
            ):
                break
            last = event.seq
        return last

    async def prune_events(self, through_seq: int, limit: int = 0) -> int:
        # Never the newest event, as in the SQL store (where it carries the head).
        end = bisect.bisect_right(self._event_seqs, min(through_seq, self.head - 1))
        del self._events[:end], self._event_seqs[:end]
        return end

    async def prune_ledger(self, older_than: datetime, limit: int) -> int:
        forgotten = 0
        while self._ledger_times and forgotten < limit and self._ledger_times[0][0] < older_than:
            _, key = self._ledger_times.popleft()
            self.receipts.pop(key, None)
            forgotten += 1
        return forgotten

    # --- tokens ---------------------------------------------------------------------

    async def issue_token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> IssuedToken:
        """A new token for `agent_id`; INVALID_ARGUMENT for an id Hello would refuse."""
        row, issued = issue(agent_id, ttl, role)
        self._tokens[row.token_id] = self._by_hash[row.token_hash] = row
        return issued

    def _valid(self, row: TokenRow) -> bool:
        return row.revoked_at is None and (row.expires_at is None or row.expires_at > utcnow())

    async def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        row = self._by_hash.get(digest)
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return Principal(row.agent_id, Role(row.role)) if self._valid(row) else None

    async def valid_token_hashes(self, hashes: Collection[str]) -> set[str]:
        return {h for h in hashes if (row := self._by_hash.get(h)) and self._valid(row)}

    async def list_tokens(self) -> list[TokenRow]:
        return list(self._tokens.values())

    async def revoke_tokens(self, agent_or_token_id: str) -> int:
        """Revoke one token by id, or every token of an agent; returns how many."""
        rows = [
            row
            for row in self._tokens.values()
            if agent_or_token_id in (row.token_id, row.agent_id) and row.revoked_at is None
        ]
        for row in rows:
            row.revoked_at = utcnow()
        return len(rows)

    async def list_tokens_page(self, limit: int, cursor: str, max_bytes: int | None = None) -> Page:
        after = sorted(token_id for token_id in self._tokens if token_id > cursor)
        page, more = paging.take(
            (self._tokens[token_id] for token_id in after), token_to_proto, limit, max_bytes
        )
        return Page([info for _, info in page], page[-1][1].token_id if more else "")

    # --- queries --------------------------------------------------------------------

    async def list_agents(
        self, online_only: bool, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        offset = int(cursor or 0)
        ordered = sorted(
            (row for row in self.agents.values() if row.online or not online_only),
            key=lambda row: (not row.online, row.agent_id),
        )
        page, more = paging.take(ordered[offset:], agent_to_proto, limit, max_bytes, paging.stub)
        return Page([info for _, info in page], str(offset + len(page)) if more else "")

    async def list_artifacts(
        self,
        kind: int,
        specialization: int,
        contributor_id: str,
        limit: int,
        cursor: str,
        max_bytes: int | None = None,
        validation_state: int = 0,
    ) -> Page:
        end = bisect.bisect_left(self._artifact_seqs, (int(cursor), "")) if cursor else None
        rows = (
            row
            for _, artifact_id in reversed(self._artifact_seqs[:end])
            if (row := self.artifacts[artifact_id])
            and kind in (0, row.kind)
            and specialization in (0, row.specialization)
            and contributor_id in ("", row.contributor_id)
            and validation_state in (0, row.validation_state)
        )
        page, more = paging.take(
            rows, lambda row: decode_stored(pb.Artifact, row.body), limit, max_bytes, paging.stub
        )
        return Page([artifact for _, artifact in page], str(page[-1][0].seq) if more else "")

    async def get_artifact(self, artifact_id: str) -> pb.Artifact | None:
        row = self.artifacts.get(artifact_id)
        return decode_stored(pb.Artifact, row.body) if row else None

    async def list_collaborations(
        self, agent_id: str, state: int, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        end = bisect.bisect_left(self._session_ids, cursor) if cursor else None
        rows = (
            row
            for session_id in reversed(self._session_ids[:end])
            if (row := self.collaborations[session_id])
            and agent_id in ("", row.initiator_id, row.target_id)
            and state in (0, row.state)
        )
        page, more = paging.take(rows, collaboration_to_proto, limit, max_bytes, paging.stub)
        return Page([c for _, c in page], page[-1][0].session_id if more else "")

    async def list_feature_requests(
        self, requester_id: str, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        end = bisect.bisect_left(self._request_seqs, (int(cursor), "")) if cursor else None
        rows = (
            row
            for _, request_id in reversed(self._request_seqs[:end])
            if (row := self.requests[request_id]) and requester_id in ("", row.requester_id)
        )

        def decode(row: FeatureRequestRow) -> pb.FeatureRequestInfo:
            info = feature_request_to_proto(row)
            info.DiscardUnknownFields()
            return info

        page, more = paging.take(rows, decode, limit, max_bytes, paging.stub)
        return Page([info for _, info in page], str(page[-1][0].seq) if more else "")

    async def knowledge_base(self, recent: int) -> pb.KnowledgeBaseSummary:
        newest = self._artifact_seqs[-recent:] if recent > 0 else []
        return pb.KnowledgeBaseSummary(
            pattern_count=self._kinds[pb.ARTIFACT_KIND_PATTERN],
            code_component_count=self._kinds[pb.ARTIFACT_KIND_CODE_COMPONENT],
            os_component_count=self._kinds[pb.ARTIFACT_KIND_OS_COMPONENT],
            feature_request_count=len(self.requests),
            recent_artifacts=[
                decode_stored(pb.Artifact, self.artifacts[artifact_id].body)
                for _, artifact_id in reversed(newest)
            ],
        )

    async def stats(self) -> pb.GetHubStatsResponse:
        by_state = Counter(row.state for row in self.collaborations.values())
        response = pb.GetHubStatsResponse(
            agents_known=len(self.agents),
            agents_online=sum(1 for row in self.agents.values() if row.online),
            feature_delivery_count=len(self.deliveries),
            collaborations_by_state={
                pb.CollaborationState.Name(state): n  # type: ignore[arg-type]
                for state, n in by_state.items()
            },
            head_seq=self.head,
        )
        by_validation = Counter(
            row.validation_state for row in self.artifacts.values() if row.validation_state
        )
        response.artifacts_by_validation_state.update(
            {pb.ValidationState.Name(state): n for state, n in by_validation.items()}  # type: ignore[arg-type]
        )
        response.knowledge_base.CopyFrom(await self.knowledge_base(recent=0))
        return response

"""The store contract: `HubStore` (everything the hub persists and queries), `StateTx` (the
small transaction the domain rules act on) and `Command` (one rule, applied to a `StateTx`).

The in-memory store and the SQL store both implement it; `store_factory.make_store` picks
one by URL, and tests/test_store_contract.py holds every store to the same tests.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from generated.kernelhub.v1 import hub_pb2 as pb

from .collaboration import Policy
from .errors import StatusError
from .models import (
    AgentRow,
    CollaborationRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    TokenRow,
    ValidationJobRow,
)
from .outcomes import Outcome
from .roles import Role
from .subscriptions import EVERYTHING, Filter, Tags

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    agent_id: str
    token: str  # plaintext: shown once, never stored
    expires_at: datetime | None
    role: Role = Role.AGENT
    created_at: datetime | None = None


@dataclass(frozen=True)
class Principal:
    """Who a valid token speaks for, and with which role."""

    agent_id: str
    role: Role


# Seqs one read of a replay looks at, at most: a filter that matches little would make a
# read scan the log until it fills a page, and a reader thread is held while it does
# (docs/benchmarks.md: ~0.35 µs a row skipped, so ~25 ms here).
REPLAY_SCAN_SEQS = 65_536


class EventPage(list[pb.HubEvent]):
    """Events in seq order; `more` says whether the log holds more after the last one.
    `through`, when a read stopped at its scan bound with the page not full: the seq up to
    which it looked, so the reader resumes there, not after the last event it got; 0
    otherwise. Every event up to `through` that will ever be committed already was when
    the page was read (a later seq was committed before it: seqs commit in order), so all
    of them the reader is entitled to are in the page."""

    more: bool = False
    through: int = 0


@dataclass(frozen=True)
class Page:
    """One page of a List query: the rows as protos and the cursor of the next page.
    A page ends after `limit` items or before `max_bytes` of them, whichever comes first;
    an item larger than `max_bytes` alone is refused (RESOURCE_EXHAUSTED naming it)."""

    items: list[Any]
    next_cursor: str


def decode_stored(kind: type[M], body: bytes) -> M:
    """A stored body without the fields the contract does not define: older hubs stored
    whatever clients sent, and those bytes must go nowhere."""
    message = kind.FromString(body)
    message.DiscardUnknownFields()
    return message


class StateTx(Protocol):
    """One group commit's view of the state, as the domain rules need it.

    Rows read are the command's to change; a changed row is written back with its `put_*`.
    Reads see the writes of earlier commands of the same commit. "Open" collaborations are
    those in `collaboration.OPEN_STATES`.
    """

    now: datetime
    now_pb: Timestamp  # `now`, converted once for every event and artifact of the commit
    policy: Policy
    origin: str  # the replica committing (its streams' agents are carried by it); "" alone

    def next_seq(self) -> int:
        """The next seq of the event log (strictly increasing)."""
        ...

    def add_event(self, event: pb.HubEvent, recipients: frozenset[str] | None, tags: Tags) -> None:
        """Append `event` (its seq set) for `recipients`, or for all but its sender (None)
        that subscribe to what `tags` say it is about."""
        ...

    def add_artifact(self, artifact: pb.Artifact, seq: int) -> None: ...
    def agent(self, agent_id: str) -> AgentRow | None: ...

    def specialization_of(self, agent_id: str) -> int:
        """The agent's specialization as this commit sees it (0: no such agent): what an
        event's tags need, without a row to change."""
        ...

    def agents(self, online_only: bool = False) -> Sequence[AgentRow]: ...
    def put_agent(self, row: AgentRow) -> None: ...

    def expired_replicas(self) -> Sequence[str]:
        """Replicas (on one PostgreSQL) whose lease has passed; none for a single hub."""
        ...

    def carried_by(self, replica_id: str, limit: int) -> Sequence[AgentRow]:
        """At most `limit` agents marked online on `replica_id`'s streams."""
        ...

    def drop_replica(self, replica_id: str) -> None:
        """Forget an expired replica's lease (its agents are all offline)."""
        ...

    def orphaned(self, limit: int) -> Sequence[AgentRow]:
        """At most `limit` agents marked online on a replica that has no lease row at all
        (dropped, or never taken); none for a single hub."""
        ...

    def replica_live(self, replica_id: str) -> bool:
        """Whether `replica_id`'s lease is live by the database's clock (a single hub: yes)."""
        ...

    def collaboration(self, session_id: str) -> CollaborationRow | None: ...

    def open_collaborations(self, agent_id: str | None) -> Sequence[CollaborationRow]:
        """Open sessions not yet due at `now`, of `agent_id` (either partner) or of all (None)."""
        ...

    def count_open(
        self, *, initiator: str | None = None, target: str | None = None, state: int | None = None
    ) -> int:
        """How many open sessions match every criterion given."""
        ...

    def due_collaborations(self, limit: int) -> Sequence[CollaborationRow]:
        """Open sessions whose deadline is at or before `now`, earliest first, at most `limit`."""
        ...

    def put_collaboration(self, row: CollaborationRow) -> None: ...
    def feature_request(self, request_id: str) -> FeatureRequestRow | None: ...
    def put_feature_request(self, row: FeatureRequestRow) -> None: ...

    def delivery_by(self, request_id: str, deliverer_id: str) -> str | None:
        """The artifact id of `deliverer_id`'s delivery of the request, if it made one."""
        ...

    def put_delivery(self, row: FeatureDeliveryRow) -> None: ...

    def receipt(self, agent_id: str, message_id: str) -> Receipt | None:
        """The receipt already given for this message id (idempotency ledger)."""
        ...

    def artifact(self, artifact_id: str) -> pb.Artifact | None:
        """A stored artifact (of an earlier commit), to change with `put_artifact`."""
        ...

    def put_artifact(self, artifact: pb.Artifact) -> None:
        """Store a changed artifact (its verdict, its validation state) under its id."""
        ...

    def add_validation_job(self, row: ValidationJobRow) -> None:
        """Queue a new component for validation (claimable from `row.available_at`)."""
        ...

    def validation_job(self, artifact_id: str) -> ValidationJobRow | None: ...
    def put_validation_job(self, row: ValidationJobRow) -> None: ...

    def claimable_jobs(self, limit: int) -> Sequence[ValidationJobRow]:
        """Jobs not done whose `available_at` is at or before `now`, by (available_at, seq),
        at most `limit` (queued by earlier commits)."""
        ...

    def leases_held(self, validator_id: str) -> int:
        """Unexpired leases of jobs not done that `validator_id` holds."""
        ...

    def next_available(self) -> datetime | None:
        """The earliest `available_at` of the jobs not done (None: there are none)."""
        ...

    def remember(self, agent_id: str, message_id: str, receipt: Receipt) -> None: ...


# A ledger entry: the first outcome of a message id, and its body's fingerprint (None: a
# ledger row from before fingerprints, or a command without one).
Receipt: TypeAlias = tuple[Outcome, bytes | None]


class Command(Protocol):
    """A state change requested by `agent_id` (message_id empty for the hub's own)."""

    agent_id: str
    message_id: str
    # Of the message's body without its message_id (empty: none): a reused message_id with
    # another body is refused, not answered with the first one's receipt.
    fingerprint: bytes

    def apply(self, tx: StateTx) -> Outcome: ...


class HubStore(Protocol):
    """Everything the hub persists: `MemoryStore` (ephemeral) or `SqlStore` (SQLite, PostgreSQL)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        """Apply the commands in order (group commit): a refused command yields its StatusError
        and the others still commit; a store that cannot commit yields UNAVAILABLE. A call
        may start before the one before it has returned (the committer's pipe): the store
        applies calls in the order they were made."""
        ...

    async def events_for(
        self,
        agent_id: str,
        after_seq: int,
        limit: int,
        max_bytes: int | None = None,
        subscription: Filter = EVERYTHING,
        scan_seqs: int = REPLAY_SCAN_SEQS,
    ) -> EventPage:
        """The events after `after_seq` that `agent_id` is entitled to, oldest first: those
        addressed to it, and broadcasts by others that match `subscription` (never presence,
        which older hubs logged). At most `limit`, and no more than `max_bytes` of them
        beyond the first (an event too large for any response still comes, alone, for its
        reader to replace). The filter is the store's to apply (tag columns), not the
        reader's. The read looks no further than `after_seq + scan_seqs` (`EventPage.through`
        says where it stopped when that cut it short)."""
        ...

    async def events_after(
        self, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        """Every event after `after_seq`, whoever it was for (a Watch stream), paged as
        `events_for` pages."""
        ...

    async def head_seq(self) -> int: ...
    async def authenticate(self, token: str) -> Principal | None: ...
    async def issue_token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> IssuedToken: ...

    # --- retention (retention.py decides what goes; each call is one bounded batch) ---

    async def oldest_seq(self) -> int:
        """The oldest seq the event log holds (1 for an empty log; pruning always keeps
        the newest event, which carries the head across restarts)."""
        ...

    async def prunable_through(
        self, through_seq: int, older_than: datetime | None, limit: int
    ) -> int:
        """Of the `limit` oldest events at or below `through_seq`, the seq of the last of
        the unbroken run from the oldest that was created before `older_than` (every one
        of them when None); 0 when there is none. Reads only."""
        ...

    async def prune_events(self, through_seq: int, limit: int = 0) -> int:
        """Delete the events at or below `through_seq` (never the newest) and their
        recipients, in one transaction; returns how many events went. Replicas: no further
        than every live replica allows, and (`limit`) at most that many seqs."""
        ...

    async def prune_ledger(self, older_than: datetime, limit: int) -> int:
        """Forget the oldest message ids remembered before `older_than`: about `limit` of
        them (the rows of one commit share a time, so a few more may go); how many went."""
        ...

    async def valid_token_hashes(self, hashes: Collection[str]) -> set[str]: ...
    async def list_tokens(self) -> list[TokenRow]: ...
    async def revoke_tokens(self, agent_or_token_id: str) -> int: ...
    async def list_tokens_page(self, limit: int, cursor: str, max_bytes: int | None = None) -> Page:
        """Tokens by token id (`pb.TokenInfo`, no secret), after the token id `cursor`."""
        ...

    async def list_agents(
        self, online_only: bool, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def list_artifacts(
        self,
        kind: int,
        specialization: int,
        contributor_id: str,
        limit: int,
        cursor: str,
        max_bytes: int | None = None,
        validation_state: int = 0,
    ) -> Page: ...
    async def get_artifact(self, artifact_id: str) -> pb.Artifact | None: ...
    async def list_collaborations(
        self, agent_id: str, state: int, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def list_feature_requests(
        self, requester_id: str, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def knowledge_base(self, recent: int) -> pb.KnowledgeBaseSummary: ...
    async def stats(self) -> pb.GetHubStatsResponse: ...

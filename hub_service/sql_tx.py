"""`StateTx` on a SQLAlchemy session: the domain rules' reads and writes as SQL, with the
append-only rows (events, recipients, artifacts, the ledger) held for one bulk insert."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import bindparam, delete, false, func, or_, update
from sqlmodel import Session, SQLModel, col, select

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from .models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    EventRecipientRow,
    EventRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    ReceivedMessageRow,
    ReplicaRow,
    ValidationJobRow,
    artifact_row,
)
from .state import Receipt, decode_stored
from .subscriptions import Tags


class Specializations:
    """The committed specialization of agents, across commits: a share's event is tagged
    with its sender's, and a commit of one share spent a third of its CPU reading it. Only
    for a writer that is the agent table's one writer (`SqlWriter` says when); a
    transaction that changes an agent forgets it at once, before its COMMIT. Bounded: full,
    it starts over."""

    def __init__(self, limit: int = 65536) -> None:
        self._limit = limit
        self._known: dict[str, int] = {}

    def get(self, agent_id: str) -> int | None:
        return self._known.get(agent_id)

    def remember(self, agent_id: str, specialization: int) -> None:
        if len(self._known) >= self._limit:
            self._known.clear()
        self._known[agent_id] = specialization

    def forget(self, agent_id: str) -> None:
        self._known.pop(agent_id, None)

    def clear(self) -> None:
        self._known.clear()


# The open sessions of some agents as committed (bound: ids, a list; now), and their rows.
_OPEN_OF_AGENTS = select(CollaborationRow).where(
    col(CollaborationRow.state).in_(collab.OPEN_STATES),
    or_(
        col(CollaborationRow.expires_at).is_(None),
        col(CollaborationRow.expires_at) > bindparam("now"),
    ),
    or_(
        col(CollaborationRow.initiator_id).in_(bindparam("ids", expanding=True)),
        col(CollaborationRow.target_id).in_(bindparam("ids", expanding=True)),
    ),
)
_AGENTS = select(AgentRow).where(col(AgentRow.agent_id).in_(bindparam("ids", expanding=True)))
_NEWEST_PRESENCE_REV = select(func.coalesce(func.max(AgentRow.presence_rev), 0))
# Ids in one IN list: the sessions' query binds them twice, and SQLite's older builds
# allow 999 variables in a statement.
_PREFETCH_CHUNK = 400


class SqlTx:
    """One group-commit transaction: the session, its clock, and the event log's tail.
    Changed rows go through the ORM; append-only rows wait in `appends` for the bulk
    insert just before the commit (nothing in the same transaction reads them back)."""

    def __init__(
        self,
        session: Session,
        now: datetime,
        next_seq: Callable[[], int],
        policy: collab.Policy,
        received: dict[tuple[str, str], Receipt],
        origin: str = "",
        specializations: Specializations | None = None,
    ) -> None:
        self.session = session
        self.origin = origin
        self._live: dict[str, bool] = {}  # whether a replica's lease is live, once asked
        self.now = now
        self.now_pb = Timestamp()
        self.now_pb.FromDatetime(now)
        self.policy = policy
        self.next_seq = next_seq
        self.appends: dict[type[SQLModel], list[dict[str, Any]]] = defaultdict(list)
        # (agent_id, message_id) -> outcome: the ledger rows of this batch's ids, read in
        # one query before it, and those it adds.
        self._received = received
        self._presence_rev: int | None = None  # the agents' newest, read at the first change
        # The agent rows this transaction read or wrote, held: the session's identity map
        # holds rows weakly, so without this every `agent` of a batch's shares (each event's
        # tags need its sender's) was a SELECT of its own, ~70% of a 64-share commit's CPU.
        self._agents: dict[str, AgentRow] = {}
        self._specializations = specializations
        # The collaboration rows this transaction added or changed (`put_collaboration`).
        self._collaborations: dict[str, CollaborationRow] = {}
        # `prefetch_agents`: the agents known to have no row, and the committed open
        # sessions of each agent it read.
        self._absent: set[str] = set()
        self._open_committed: dict[str, list[CollaborationRow]] = {}

    def _append(self, model: type[SQLModel], **values: Any) -> None:
        self.appends[model].append(values)

    # --- the append-only tables --------------------------------------------------

    def add_event(self, event: pb.HubEvent, recipients: frozenset[str] | None, tags: Tags) -> None:
        self._append(
            EventRow,
            seq=event.seq,
            sender_id=event.sender_id,
            broadcast=recipients is None,
            kind=tags.kind,
            artifact_kind=tags.artifact_kind,
            spec_mask=tags.spec_mask,
            created_at=self.now,
            body=event.SerializeToString(),
        )
        for agent_id in sorted(recipients or tags.also_to):
            self._append(EventRecipientRow, seq=event.seq, agent_id=agent_id)

    def add_artifact(self, artifact: pb.Artifact, seq: int) -> None:
        self._append(ArtifactRow, **artifact_row(artifact, seq, self.now))

    def receipt(self, agent_id: str, message_id: str) -> Receipt | None:
        return self._received.get((agent_id, message_id))

    def remember(self, agent_id: str, message_id: str, receipt: Receipt) -> None:
        self._received[(agent_id, message_id)] = receipt
        outcome, fingerprint = receipt
        self._append(
            ReceivedMessageRow,
            agent_id=agent_id,
            message_id=message_id,
            seq=outcome.seq,
            resource_id=outcome.resource_id,
            created_at=self.now,
            fingerprint=fingerprint,
        )

    # --- rows the commands change ------------------------------------------------

    def prefetch_agents(self, agent_ids: Collection[str]) -> None:
        """Read the rows and open sessions of agents whose presence the batch changes, in a
        few queries before its commands (400 ids a query): each AgentOnline's own SELECTs (and the flush of
        its predecessor's row each one forced) were most of a connect storm's commit."""
        wanted = sorted(set(agent_ids) - self._agents.keys())
        if len(wanted) < 2:
            return  # one agent: its own reads cost no more
        with self.session.no_autoflush:
            for start in range(0, len(wanted), _PREFETCH_CHUNK):
                chunk = wanted[start : start + _PREFETCH_CHUNK]
                for row in self.session.exec(_AGENTS, params={"ids": chunk}):
                    self._agents[row.agent_id] = row
                self._absent.update(a for a in chunk if a not in self._agents)
                opened: dict[str, list[CollaborationRow]] = {a: [] for a in chunk}
                for collaboration in self.session.exec(
                    _OPEN_OF_AGENTS, params={"ids": chunk, "now": self.now}
                ):
                    for agent_id in {collaboration.initiator_id, collaboration.target_id}:
                        if agent_id in opened:
                            opened[agent_id].append(collaboration)
                self._open_committed.update(opened)

    def agent(self, agent_id: str) -> AgentRow | None:
        row = self._agents.get(agent_id)
        if row is None:
            if agent_id in self._absent:
                return None
            row = self.session.get(AgentRow, agent_id)
            if row is not None:
                self._agents[agent_id] = row
        return row

    def specialization_of(self, agent_id: str) -> int:
        row = self._agents.get(agent_id)
        if row is not None:  # read or changed by this transaction: as it sees it
            return row.specialization
        known = self._specializations
        if known is not None and (specialization := known.get(agent_id)) is not None:
            return specialization
        row = self.agent(agent_id)
        if row is None:
            return 0
        if known is not None:  # as committed: this transaction has not changed it
            known.remember(agent_id, row.specialization)
        return row.specialization

    def agents(self, online_only: bool = False) -> Sequence[AgentRow]:
        query = select(AgentRow)
        if online_only:
            query = query.where(col(AgentRow.online))
        return self.session.exec(query).all()

    def put_agent(self, row: AgentRow) -> None:
        # A presence change: the next revision, after every one committed (replicas take it
        # under the log's lock, so revisions commit in order, as seqs do).
        if self._presence_rev is None:
            with self.session.no_autoflush:  # of committed rows: what is pending has none yet
                self._presence_rev = int(self.session.exec(_NEWEST_PRESENCE_REV).one())
        self._presence_rev += 1
        row.presence_rev = self._presence_rev
        self.session.add(row)
        self._agents[row.agent_id] = row
        if self._specializations is not None:
            # Forgotten now, not at COMMIT: one that fails (or lands unbeknown) leaves no
            # stale entry behind.
            self._specializations.forget(row.agent_id)

    @property
    def presence_rev(self) -> int | None:
        """The newest presence revision this transaction wrote (None: it changed none)."""
        return self._presence_rev

    def expired_replicas(self) -> Sequence[str]:
        """The replicas whose lease has passed, by the database's clock, locked until the
        commit: a replica renewing (or re-registering) then waits for this transaction."""
        return self.session.exec(
            select(ReplicaRow.replica_id)
            .where(col(ReplicaRow.expires_at) < func.now())
            .order_by(col(ReplicaRow.replica_id))
            .with_for_update()
        ).all()

    def carried_by(self, replica_id: str, limit: int) -> Sequence[AgentRow]:
        return self.session.exec(
            select(AgentRow)
            .where(col(AgentRow.online), col(AgentRow.replica_id) == replica_id)
            .order_by(col(AgentRow.agent_id))
            .limit(limit)
        ).all()

    def drop_replica(self, replica_id: str) -> None:
        self.session.execute(delete(ReplicaRow).where(col(ReplicaRow.replica_id) == replica_id))

    def orphaned(self, limit: int) -> Sequence[AgentRow]:
        leased = select(ReplicaRow.replica_id).where(
            col(ReplicaRow.replica_id) == col(AgentRow.replica_id)
        )
        return self.session.exec(
            select(AgentRow)
            .where(col(AgentRow.online), col(AgentRow.replica_id) != "", ~leased.exists())
            .order_by(col(AgentRow.agent_id))
            .limit(limit)
        ).all()

    def replica_live(self, replica_id: str) -> bool:
        if not replica_id:
            return True  # a single hub
        if replica_id not in self._live:  # once a transaction (now() is its start): a
            self._live[replica_id] = (  # connect storm commits hundreds of AgentOnlines in one
                self.session.exec(
                    select(ReplicaRow.replica_id).where(
                        col(ReplicaRow.replica_id) == replica_id,
                        col(ReplicaRow.expires_at) > func.now(),
                    )
                ).first()
                is not None
            )
        return self._live[replica_id]

    def collaboration(self, session_id: str) -> CollaborationRow | None:
        return self.session.get(CollaborationRow, session_id)

    def open_collaborations(self, agent_id: str | None) -> Sequence[CollaborationRow]:
        if agent_id is not None:
            return self._open_collaborations_of(agent_id)
        query = select(CollaborationRow).where(
            col(CollaborationRow.state).in_(collab.OPEN_STATES),
            or_(
                col(CollaborationRow.expires_at).is_(None),
                col(CollaborationRow.expires_at) > self.now,
            ),
        )
        return self.session.exec(query).all()

    def _open_collaborations_of(self, agent_id: str) -> list[CollaborationRow]:
        """The committed rows, read without a flush, with this transaction's own changes
        laid over them (every change goes through `put_collaboration`). Every AgentOnline
        asks: with autoflush each one flushed its agent row on its own, and this read was
        half the writer's time in a connect storm."""
        committed = self._open_committed.get(agent_id)
        if committed is None:
            with self.session.no_autoflush:
                committed = list(
                    self.session.exec(
                        _OPEN_OF_AGENTS, params={"ids": [agent_id], "now": self.now}
                    ).all()
                )
        rows = {row.session_id: row for row in committed}
        for row in self._collaborations.values():
            if agent_id in (row.initiator_id, row.target_id):
                rows[row.session_id] = row
        return [  # as they stand now, in memory (a committed row may have changed since)
            row
            for row in rows.values()
            if row.state in collab.OPEN_STATES
            and (row.expires_at is None or row.expires_at > self.now)
        ]

    def count_open(
        self, *, initiator: str | None = None, target: str | None = None, state: int | None = None
    ) -> int:
        query = (
            select(func.count())
            .select_from(CollaborationRow)
            .where(col(CollaborationRow.state).in_(collab.OPEN_STATES))
        )
        if initiator is not None:
            query = query.where(col(CollaborationRow.initiator_id) == initiator)
        if target is not None:
            query = query.where(col(CollaborationRow.target_id) == target)
        if state is not None:
            query = query.where(col(CollaborationRow.state) == state)
        return int(self.session.exec(query).one())

    def due_collaborations(self, limit: int) -> Sequence[CollaborationRow]:
        return self.session.exec(
            select(CollaborationRow)
            .where(
                col(CollaborationRow.state).in_(collab.OPEN_STATES),
                col(CollaborationRow.expires_at) <= self.now,
            )
            .order_by(col(CollaborationRow.expires_at))
            .limit(limit)
        ).all()

    def put_collaboration(self, row: CollaborationRow) -> None:
        self.session.add(row)
        self._collaborations[row.session_id] = row

    def feature_request(self, request_id: str) -> FeatureRequestRow | None:
        return self.session.get(FeatureRequestRow, request_id)

    def put_feature_request(self, row: FeatureRequestRow) -> None:
        self.session.add(row)

    def delivery_by(self, request_id: str, deliverer_id: str) -> str | None:
        return self.session.exec(
            select(FeatureDeliveryRow.artifact_id).where(
                col(FeatureDeliveryRow.request_id) == request_id,
                col(FeatureDeliveryRow.deliverer_id) == deliverer_id,
            )
        ).first()

    def put_delivery(self, row: FeatureDeliveryRow) -> None:
        self.session.add(row)

    # --- the validation queue -----------------------------------------------------

    def artifact(self, artifact_id: str) -> pb.Artifact | None:
        body = self.session.exec(
            select(ArtifactRow.body).where(col(ArtifactRow.artifact_id) == artifact_id)
        ).first()
        return decode_stored(pb.Artifact, body) if body is not None else None

    def put_artifact(self, artifact: pb.Artifact) -> None:
        self.session.exec(
            update(ArtifactRow)
            .where(col(ArtifactRow.artifact_id) == artifact.artifact_id)
            .values(body=artifact.SerializeToString(), validation_state=artifact.validation_state)
        )

    def add_validation_job(self, row: ValidationJobRow) -> None:
        self._append(ValidationJobRow, **row.model_dump())

    def validation_job(self, artifact_id: str) -> ValidationJobRow | None:
        return self.session.get(ValidationJobRow, artifact_id)

    def put_validation_job(self, row: ValidationJobRow) -> None:
        self.session.add(row)

    def claimable_jobs(self, limit: int) -> Sequence[ValidationJobRow]:
        return self.session.exec(
            select(ValidationJobRow)
            .where(
                col(ValidationJobRow.done) == false(),
                col(ValidationJobRow.available_at) <= self.now,
            )
            .order_by(col(ValidationJobRow.available_at), col(ValidationJobRow.seq))
            .limit(limit)
        ).all()

    def leases_held(self, validator_id: str) -> int:
        return int(
            self.session.exec(
                select(func.count())
                .select_from(ValidationJobRow)
                .where(
                    col(ValidationJobRow.validator_id) == validator_id,
                    col(ValidationJobRow.done) == false(),
                    col(ValidationJobRow.available_at) > self.now,
                )
            ).one()
        )

    def next_available(self) -> datetime | None:
        return self.session.exec(
            select(func.min(ValidationJobRow.available_at)).where(
                col(ValidationJobRow.done) == false()
            )
        ).one()

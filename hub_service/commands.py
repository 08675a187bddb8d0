"""What each trainer message does to the hub's state, applied inside one transaction.

A command checks everything it needs *before* it writes, so a refused command
raises `HubError` with nothing to undo and the other commands of the same
group commit go on. Each command says which events it produced and who may
receive them; the router delivers them once the transaction has committed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import func, or_, update
from sqlmodel import Session, SQLModel, col, select

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from .errors import HubError, failed_precondition, not_found, permission_denied
from .features import capable_agents, name_some
from .models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    EventRecipientRow,
    EventRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    agent_to_proto,
    capabilities_of,
    collaboration_to_proto,
    new_id,
)
from .validation import COLLABORATION_SESSION_ATTRIBUTE

State = pb.CollaborationState


@dataclass(frozen=True)
class RoutedEvent:
    """A committed event and its audience: `recipients`, or (None) every agent but the sender."""

    event: pb.HubEvent
    recipients: frozenset[str] | None


@dataclass
class Outcome:
    """What a committed command answers with: the receipt's fields and the events to route."""

    seq: int = 0
    resource_id: str = ""
    duplicate: bool = False
    events: list[RoutedEvent] = field(default_factory=list)


class Tx:
    """One group-commit transaction: the session, its clock, and the event log's tail."""

    def __init__(
        self, session: Session, now: datetime, next_seq: Callable[[], int], policy: collab.Policy
    ) -> None:
        self.session = session
        self.now = now
        self.now_pb = Timestamp()  # converted once: every event and artifact of the batch has it
        self.now_pb.FromDatetime(now)
        self.policy = policy
        self._next_seq = next_seq
        # Append-only rows (events, artifacts, ...), inserted in bulk just before the commit:
        # nothing in the same transaction reads them back.
        self.appends: dict[type[SQLModel], list[dict[str, Any]]] = defaultdict(list)
        # (agent_id, message_id) -> outcome and body fingerprint (None: unknown), for
        # idempotency across and within batches.
        self.received: dict[tuple[str, str], tuple[Outcome, bytes | None]] = {}

    def append(self, model: type[SQLModel], **values: Any) -> None:
        self.appends[model].append(values)

    def emit(
        self, outcome: Outcome, sender: str, recipients: frozenset[str] | None, **body: Any
    ) -> int:
        """Append an event to the log; it is routed only after the commit."""
        seq = self._next_seq()
        event = pb.HubEvent(seq=seq, sender_id=sender, **body)
        event.create_time.CopyFrom(self.now_pb)
        self.append(
            EventRow,
            seq=seq,
            sender_id=sender,
            broadcast=recipients is None,
            created_at=self.now,
            body=event.SerializeToString(),
        )
        for agent_id in sorted(recipients or ()):
            self.append(EventRecipientRow, seq=seq, agent_id=agent_id)
        outcome.events.append(RoutedEvent(event, recipients))
        outcome.seq = seq
        return seq

    def stamp(self, artifact: pb.Artifact, contributor: str) -> pb.Artifact:
        """Give an artifact its hub-assigned id, contributor and time."""
        artifact.artifact_id = new_id("art")
        artifact.contributor_id = contributor
        artifact.create_time.CopyFrom(self.now_pb)
        return artifact

    def store_artifact(self, outcome: Outcome, sender: str, artifact: pb.Artifact) -> str:
        """Stamp, store and broadcast an artifact; returns its hub-assigned id."""
        seq = self.emit(outcome, sender, None, artifact_shared=self.stamp(artifact, sender))
        self.append(ArtifactRow, **artifact_row(artifact, seq, self.now))
        return artifact.artifact_id


def artifact_row(artifact: pb.Artifact, seq: int, now: datetime) -> dict[str, Any]:
    content = artifact.WhichOneof("content")
    specialization: int
    if content == "pattern":
        specialization, name = artifact.pattern.specialization, artifact.pattern.pattern_type
    elif content == "code_component":
        specialization = artifact.code_component.specialization
        name = artifact.code_component.name
    else:
        specs = artifact.os_component.specializations
        specialization, name = (specs[0] if specs else 0), artifact.os_component.name
    return {
        "artifact_id": artifact.artifact_id,
        "seq": seq,
        "kind": artifact.kind,
        "contributor_id": artifact.contributor_id,
        "specialization": specialization,
        "name": name[:200],
        "created_at": now,
        "body": artifact.SerializeToString(),
    }


class Command(Protocol):
    """A state change requested by `agent_id` (message_id empty for the hub's own)."""

    agent_id: str
    message_id: str
    # Of the message's body without its message_id (empty: none): a reused message_id with
    # another body is refused, not answered with the first one's receipt.
    fingerprint: bytes

    def apply(self, tx: Tx) -> Outcome: ...


# --- presence ---------------------------------------------------------------


@dataclass
class AgentOnline:
    agent_id: str
    hello: pb.Hello
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        row = tx.session.get(AgentRow, self.agent_id) or AgentRow(
            agent_id=self.agent_id, created_at=tx.now
        )
        row.specialization = self.hello.specialization
        row.capabilities = "\n".join(self.hello.capabilities)
        row.version = self.hello.version
        row.online = True
        row.last_seen_at = tx.now
        tx.session.add(row)
        _reset_deadlines(tx, self.agent_id)  # back in time: no longer held to the grace
        outcome = Outcome(resource_id=self.agent_id)
        tx.emit(
            outcome, self.agent_id, None, agent_joined=pb.AgentJoined(agent=agent_to_proto(row))
        )
        return outcome


@dataclass
class AgentOffline:
    agent_id: str
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        row = tx.session.get(AgentRow, self.agent_id)
        outcome = Outcome(resource_id=self.agent_id)
        if row is None:
            return outcome
        row.online = False
        row.last_seen_at = tx.now
        tx.session.add(row)
        _reset_deadlines(tx, self.agent_id)
        tx.emit(outcome, self.agent_id, None, agent_left=pb.AgentLeft(agent_id=self.agent_id))
        return outcome


@dataclass
class ResetPresence:
    """At start-up nobody is connected yet, whatever the last run left behind."""

    agent_id: str = ""
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        # When those still marked online left is unknown (the hub was down): they get the
        # whole grace from now to come back.
        tx.session.execute(
            update(AgentRow).where(col(AgentRow.online)).values(online=False, last_seen_at=tx.now)
        )
        _reset_deadlines(tx, None)
        return Outcome()


def _offline_since(tx: Tx, row: CollaborationRow) -> datetime | None:
    """When the session's partner that is offline (the earlier, if both) was last seen."""
    seen = []
    for agent_id in (row.initiator_id, row.target_id):
        agent = tx.session.get(AgentRow, agent_id)
        if agent is None:
            seen.append(tx.now)
        elif not agent.online:
            seen.append(agent.last_seen_at)
    return min(seen, default=None)


def _set_deadline(tx: Tx, row: CollaborationRow) -> None:
    """The one place a deadline is set: the state's TTL from the session's last step,
    but no later than the grace after an offline partner was last seen."""
    row.expires_at = tx.policy.deadline(row.state, row.updated_at, _offline_since(tx, row))


def _reset_deadlines(tx: Tx, agent_id: str | None) -> None:
    """Recompute the deadlines of `agent_id`'s open sessions (None: every open session)
    after a change of presence."""
    query = select(CollaborationRow).where(
        col(CollaborationRow.state).in_(collab.OPEN_STATES),
        # A session already due stays due: coming back too late revives nothing.
        or_(col(CollaborationRow.expires_at).is_(None), col(CollaborationRow.expires_at) > tx.now),
    )
    if agent_id is not None:
        query = query.where(
            or_(
                col(CollaborationRow.initiator_id) == agent_id,
                col(CollaborationRow.target_id) == agent_id,
            )
        )
    for row in tx.session.exec(query):
        _set_deadline(tx, row)
        tx.session.add(row)


# --- sharing ----------------------------------------------------------------


@dataclass
class ShareArtifact:
    agent_id: str
    message_id: str
    artifact: pb.Artifact  # content and kind set; the hub stamps the rest
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        outcome = Outcome()
        outcome.resource_id = tx.store_artifact(outcome, self.agent_id, self.artifact)
        return outcome


# --- features ---------------------------------------------------------------


@dataclass
class RequestFeature:
    agent_id: str
    message_id: str
    request: pb.RequestFeature
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        agents = tx.session.exec(select(AgentRow)).all()
        routed = capable_agents(
            self.request.feature, self.agent_id, ((a.agent_id, capabilities_of(a)) for a in agents)
        )
        info = pb.FeatureRequestInfo(
            request_id=new_id("feat"),
            requester_id=self.agent_id,
            feature=self.request.feature,
            requirements=self.request.requirements,
            description=self.request.description,
            routed_to=routed,
        )
        info.create_time.CopyFrom(tx.now_pb)
        outcome = Outcome(resource_id=info.request_id)
        recipients = frozenset(routed) if routed else None
        seq = tx.emit(
            outcome, self.agent_id, recipients, feature_requested=pb.FeatureRequested(request=info)
        )
        tx.session.add(
            FeatureRequestRow(
                request_id=info.request_id,
                seq=seq,
                requester_id=self.agent_id,
                feature=info.feature,
                created_at=tx.now,
                body=info.SerializeToString(),
            )
        )
        return outcome


@dataclass
class DeliverFeature:
    agent_id: str
    message_id: str
    delivery: pb.DeliverFeature
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        request = tx.session.get(FeatureRequestRow, self.delivery.request_id)
        if request is None:
            raise not_found(f"feature request {self.delivery.request_id}")
        if request.requester_id == self.agent_id:
            raise failed_precondition(
                f"feature request {request.request_id} is your own; another agent must deliver it"
            )
        routed_to = pb.FeatureRequestInfo.FromString(request.body).routed_to
        if routed_to and self.agent_id not in routed_to:
            raise permission_denied(
                f"feature request {request.request_id} was routed to {name_some(routed_to)} "
                "only; only they may deliver it"
            )
        earlier = tx.session.exec(
            select(FeatureDeliveryRow.artifact_id).where(
                col(FeatureDeliveryRow.request_id) == request.request_id,
                col(FeatureDeliveryRow.deliverer_id) == self.agent_id,
            )
        ).first()
        if earlier is not None:
            raise HubError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"you already delivered feature request {request.request_id} "
                f"(artifact {earlier}); an agent delivers a request once",
            )
        limit = tx.policy.max_deliveries_per_request
        if request.delivery_count >= limit:
            raise HubError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"feature request {request.request_id} already has {limit} deliveries "
                "(the limit per request)",
            )
        outcome = Outcome()
        artifact = tx.stamp(
            pb.Artifact(kind=pb.ARTIFACT_KIND_OS_COMPONENT, os_component=self.delivery.component),
            self.agent_id,
        )
        seq = tx.emit(
            outcome,
            self.agent_id,
            frozenset({request.requester_id}),
            feature_delivered=pb.FeatureDelivered(request_id=request.request_id, artifact=artifact),
        )
        tx.append(ArtifactRow, **artifact_row(artifact, seq, tx.now))
        tx.session.add(
            FeatureDeliveryRow(
                artifact_id=artifact.artifact_id,
                request_id=request.request_id,
                deliverer_id=self.agent_id,
                created_at=tx.now,
            )
        )
        request.delivery_count += 1
        tx.session.add(request)
        outcome.resource_id = artifact.artifact_id
        return outcome


# --- collaborations ---------------------------------------------------------


def _count_open(tx: Tx, *where: Any) -> int:
    query = (
        select(func.count())
        .select_from(CollaborationRow)
        .where(col(CollaborationRow.state).in_(collab.OPEN_STATES), *where)
    )
    return int(tx.session.exec(query).one())


def _check_taken_on(tx: Tx, agent_id: str) -> None:
    """An agent's own budget: sessions it proposed and that are open, or that it accepted.
    Proposals made to it are not in it, so nobody else can fill it."""
    limit = tx.policy.max_open_per_agent
    taken_on = _count_open(
        tx,
        or_(
            col(CollaborationRow.initiator_id) == agent_id,
            (col(CollaborationRow.target_id) == agent_id)
            & (col(CollaborationRow.state) == State.COLLABORATION_STATE_ACTIVE),
        ),
    )
    if taken_on >= limit:
        raise HubError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"agent {agent_id} already has {limit} open collaborations it proposed or accepted "
            "(the limit per agent); one must end first",
        )


def _check_proposal_limits(tx: Tx, initiator: str, target: str) -> None:
    """Limits that protect the target: one proposer holds at most `max_open_per_pair` of
    its sessions, and unanswered proposals to it are bounded."""
    _check_taken_on(tx, initiator)
    pair_limit = tx.policy.max_open_per_pair
    pair = _count_open(
        tx,
        or_(
            (col(CollaborationRow.initiator_id) == initiator)
            & (col(CollaborationRow.target_id) == target),
            (col(CollaborationRow.initiator_id) == target)
            & (col(CollaborationRow.target_id) == initiator),
        ),
    )
    if pair >= pair_limit:
        raise HubError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{initiator} and {target} already have {pair_limit} open collaborations together "
            "(the limit per pair of agents); one must end first",
        )
    incoming_limit = tx.policy.max_incoming_proposals
    incoming = _count_open(
        tx,
        col(CollaborationRow.target_id) == target,
        col(CollaborationRow.state) == State.COLLABORATION_STATE_PROPOSED,
    )
    if incoming >= incoming_limit:
        raise HubError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"agent {target} already has {incoming_limit} unanswered proposals "
            "(the limit of proposals waiting for one agent); try again later",
        )


def _notify_partners(tx: Tx, outcome: Outcome, sender: str, row: CollaborationRow) -> None:
    tx.emit(
        outcome,
        sender,
        frozenset({row.initiator_id, row.target_id}),
        collaboration_updated=pb.CollaborationUpdated(collaboration=collaboration_to_proto(row)),
    )


@dataclass
class ProposeCollaboration:
    agent_id: str
    message_id: str
    proposal: pb.ProposeCollaboration
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        target = self.proposal.target_agent_id
        if target == self.agent_id:
            raise failed_precondition("you cannot propose a collaboration to yourself")
        target_row = tx.session.get(AgentRow, target)
        if target_row is None:
            raise not_found(f"agent {target}")
        initiator_row = tx.session.get(AgentRow, self.agent_id)
        _check_proposal_limits(tx, self.agent_id, target)
        state = State.COLLABORATION_STATE_PROPOSED
        row = CollaborationRow(
            session_id=new_id("collab"),
            initiator_id=self.agent_id,
            target_id=target,
            type=self.proposal.type,
            description=self.proposal.description,
            initiator_specialization=initiator_row.specialization if initiator_row else 0,
            target_specialization=target_row.specialization,
            state=state,
            created_at=tx.now,
            updated_at=tx.now,
        )
        _set_deadline(tx, row)
        tx.session.add(row)
        outcome = Outcome(resource_id=row.session_id)
        _notify_partners(tx, outcome, self.agent_id, row)
        return outcome


@dataclass
class CollaborationStep:
    """Accept, decline, progress or complete: one step of the state machine."""

    agent_id: str
    message_id: str
    session_id: str
    step: collab.Step
    progress: float = 0.0
    note: str = ""
    component: pb.OsComponent | None = None
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        row = tx.session.get(CollaborationRow, self.session_id)
        if row is None:
            raise not_found(f"collaboration {self.session_id}")
        if row.expires_at is not None and row.expires_at <= tx.now and collab.is_open(row.state):
            raise failed_precondition(
                f"collaboration {self.session_id} has passed its deadline and is expiring"
            )
        new_state = collab.advance(
            session_id=row.session_id,
            state=row.state,
            initiator=row.initiator_id,
            target=row.target_id,
            actor=self.agent_id,
            step=self.step,
        )
        if self.step is collab.Step.ACCEPT:  # accepting takes the session on
            _check_taken_on(tx, self.agent_id)
        row.state = new_state
        row.updated_at = tx.now
        _set_deadline(tx, row)
        outcome = Outcome(resource_id=row.session_id)
        if self.step is collab.Step.DECLINE:
            row.end_reason = self.note or f"declined by {self.agent_id}"
        elif self.step is collab.Step.PROGRESS:
            row.progress = self.progress
            row.last_note = self.note
        elif self.step is collab.Step.COMPLETE:
            assert self.component is not None  # validation requires it
            component = pb.OsComponent()
            component.CopyFrom(self.component)
            component.attributes[COLLABORATION_SESSION_ATTRIBUTE] = row.session_id
            artifact = pb.Artifact(kind=pb.ARTIFACT_KIND_OS_COMPONENT, os_component=component)
            row.result_artifact_id = tx.store_artifact(outcome, self.agent_id, artifact)
            row.progress = 1.0
            outcome.resource_id = row.result_artifact_id
        tx.session.add(row)
        _notify_partners(tx, outcome, self.agent_id, row)
        return outcome


@dataclass
class ExpireDue:
    """The hub's own step: end open sessions whose deadline has passed."""

    batch_limit: int = 500
    agent_id: str = ""
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: Tx) -> Outcome:
        outcome = Outcome()
        due = tx.session.exec(
            select(CollaborationRow)
            .where(
                col(CollaborationRow.state).in_(collab.OPEN_STATES),
                col(CollaborationRow.expires_at) <= tx.now,
            )
            .order_by(col(CollaborationRow.expires_at))
            .limit(self.batch_limit)
        ).all()
        for row in due:
            offline = next(
                (
                    agent_id
                    for agent_id in (row.initiator_id, row.target_id)
                    if not (agent := tx.session.get(AgentRow, agent_id)) or not agent.online
                ),
                None,
            )
            row.end_reason = collab.expiry_reason(row.state, offline)
            row.state = State.COLLABORATION_STATE_EXPIRED
            row.updated_at = tx.now
            row.expires_at = None
            tx.session.add(row)
            _notify_partners(tx, outcome, "", row)
        return outcome

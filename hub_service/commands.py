"""The domain rules: what each trainer message does to the hub's state.

Each command's `apply` acts on a `state.StateTx`, which the in-memory and the SQL store
both implement: no rule knows how the state is stored. A command checks everything it
needs *before* it writes, so a refused command raises `StatusError` with nothing to undo and
the other commands of the same group commit go on. Each command says which events it
produced and who may receive them; the router delivers them once the commit is durable.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from .errors import StatusError, failed_precondition, not_found, permission_denied, unavailable
from .features import capable_agents, name_some
from .models import (
    AgentRow,
    CollaborationRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    ValidationJobRow,
    agent_to_proto,
    capabilities_of,
    collaboration_to_proto,
    new_id,
)
from .outcomes import Outcome, RoutedEvent
from .state import Command, StateTx
from .subscriptions import tags_of
from .validation import COLLABORATION_SESSION_ATTRIBUTE

State = pb.CollaborationState


def presence_changes(commands: Sequence[Command]) -> set[str]:
    """The agents whose rows (and open sessions) a batch's commands read for certain: a
    store may read them all at once, before the first."""
    return {c.agent_id for c in commands if isinstance(c, AgentOnline | AgentOffline)}


def apply_command(tx: StateTx, command: Command) -> Outcome:
    """`command.apply`, once per (agent, message_id): a message id seen before gets its
    first receipt back, marked duplicate, with nothing to route again; seen before with
    another body (fingerprints differ), it is refused ALREADY_EXISTS."""
    if command.message_id and (seen := tx.receipt(command.agent_id, command.message_id)):
        first, fingerprint = seen
        if fingerprint and command.fingerprint and fingerprint != command.fingerprint:
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"message_id {command.message_id} was already used for a different message "
                f"(seq {first.seq}); use a new message_id",
            )
        return Outcome(seq=first.seq, resource_id=first.resource_id, duplicate=True)
    outcome = command.apply(tx)
    if command.message_id:
        receipt = Outcome(outcome.seq, outcome.resource_id)
        tx.remember(command.agent_id, command.message_id, (receipt, command.fingerprint or None))
    return outcome


def emit(
    tx: StateTx,
    outcome: Outcome,
    sender: str,
    recipients: frozenset[str] | None,
    about: pb.HubEvent | None = None,
    **body: Any,
) -> int:
    """Append an event to the log; it is routed only after the commit. Its subscription tags
    are those of the event itself, or of `about` (a verdict is tagged with its artifact's
    kinds and specializations, so it reaches whoever subscribed to such artifacts); the
    contributor a filter names is always the event's sender, as the log's column is."""
    seq = tx.next_seq()
    event = pb.HubEvent(seq=seq, sender_id=sender, **body)
    event.create_time.CopyFrom(tx.now_pb)
    tagged = about or event
    contributor = tagged.sender_id if recipients is None else ""
    tags = tags_of(tagged, tx.specialization_of(contributor) if contributor else 0)
    if about is not None:
        # The contributor hears of its own artifact whatever it subscribed to.
        tags = replace(tags, contributor=sender, also_to=frozenset({about.sender_id}) - {sender})
    tx.add_event(event, recipients, tags)
    outcome.events.append(RoutedEvent(event, recipients, tags))
    outcome.seq = seq
    return seq


# What validators build and test: every shared component (patterns are not code).
COMPONENT_KINDS = frozenset({pb.ARTIFACT_KIND_CODE_COMPONENT, pb.ARTIFACT_KIND_OS_COMPONENT})


def stamp(tx: StateTx, artifact: pb.Artifact, contributor: str) -> pb.Artifact:
    """Give an artifact its hub-assigned id, contributor and time (and a component its
    PENDING validation: no client can claim a verdict for itself)."""
    artifact.artifact_id = new_id("art")
    artifact.contributor_id = contributor
    artifact.create_time.CopyFrom(tx.now_pb)
    artifact.ClearField("verdict")
    artifact.validation_state = (
        pb.VALIDATION_STATE_PENDING
        if artifact.kind in COMPONENT_KINDS
        else pb.VALIDATION_STATE_UNSPECIFIED
    )
    return artifact


def add_artifact(
    tx: StateTx, artifact: pb.Artifact, seq: int, audience: frozenset[str] = frozenset()
) -> None:
    """Store a stamped artifact; a component also joins the validation queue (its verdict
    goes to `audience`, or by subscription when that is empty)."""
    tx.add_artifact(artifact, seq)
    if artifact.kind in COMPONENT_KINDS:
        tx.add_validation_job(
            ValidationJobRow(
                artifact_id=artifact.artifact_id,
                seq=seq,
                available_at=tx.now,
                created_at=tx.now,
                audience="\n".join(sorted(audience)),
            )
        )


def store_artifact(tx: StateTx, outcome: Outcome, sender: str, artifact: pb.Artifact) -> str:
    """Stamp, store and broadcast an artifact; returns its hub-assigned id."""
    seq = emit(tx, outcome, sender, None, artifact_shared=stamp(tx, artifact, sender))
    add_artifact(tx, artifact, seq)
    return artifact.artifact_id


# --- presence ---------------------------------------------------------------


@dataclass
class AgentOnline:
    agent_id: str
    hello: pb.Hello
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        if not tx.replica_live(tx.origin):
            # Its lease ran out (or its row was dropped): the leader may have marked its
            # agents offline already, and would never see this one, carried by no live replica.
            raise unavailable("this replica's lease has lapsed; reconnect shortly")
        row = tx.agent(self.agent_id) or AgentRow(agent_id=self.agent_id, created_at=tx.now)
        row.specialization = self.hello.specialization
        row.capabilities = "\n".join(self.hello.capabilities)
        row.version = self.hello.version
        row.online = True
        row.last_seen_at = tx.now
        row.replica_id = tx.origin
        tx.put_agent(row)
        _reset_deadlines(tx, self.agent_id)  # back in time: no longer held to the grace
        # Presence is state, not history: no event; the router tells who wants to know.
        return Outcome(
            resource_id=self.agent_id, agent=agent_to_proto(row), presence_rev=row.presence_rev
        )


@dataclass
class AgentOffline:
    agent_id: str
    message_id: str = ""
    fingerprint: bytes = b""
    # The presence revision of the ending stream's AgentOnline; None: whatever came after.
    # A later change of the row (a stream on another replica came online) wins.
    rev: int | None = None

    def apply(self, tx: StateTx) -> Outcome:
        row = tx.agent(self.agent_id)
        outcome = Outcome(resource_id=self.agent_id)
        if row is None:
            return outcome
        if self.rev is not None and row.presence_rev > self.rev:
            return outcome  # it connected again since, elsewhere
        if row.online and row.replica_id not in ("", tx.origin):
            return outcome  # another replica carries it now
        _go_offline(tx, row)
        return outcome


def _go_offline(tx: StateTx, row: AgentRow) -> None:
    """The agent left now: its partners' open sessions get the offline grace from now."""
    row.online = False
    row.last_seen_at = tx.now
    row.replica_id = ""
    tx.put_agent(row)
    _reset_deadlines(tx, row.agent_id)


@dataclass
class ExpireReplicas:
    """The leader's step: the agents whose streams a replica carried whose lease expired
    (killed, or paused or cut off for longer than its lease) go offline, as if each had
    disconnected now; once it carries none, its lease row goes. Replicas renewing wait for
    this commit (the expired rows are locked), so none is reaped while it renews.

    With `orphans` (at a takeover, and once per lease), also the agents left online on a
    replica with no lease row at all, which no expiry would ever find."""

    batch_limit: int = 500
    orphans: bool = False
    agent_id: str = ""
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        budget = self.batch_limit
        outcome = Outcome()
        for replica_id in tx.expired_replicas():
            carried = tx.carried_by(replica_id, budget + 1)
            for row in carried[:budget]:
                _go_offline(tx, row)
            if len(carried) > budget:
                outcome.more = True  # the next run goes on
                break
            budget -= len(carried)
            tx.drop_replica(replica_id)
        if self.orphans and not outcome.more:
            orphaned = tx.orphaned(budget + 1)
            for row in orphaned[:budget]:
                _go_offline(tx, row)
            outcome.more = len(orphaned) > budget
        return outcome


@dataclass
class ResetPresence:
    """At start-up nobody is connected yet, whatever the last run left behind."""

    agent_id: str = ""
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        # When those still marked online left is unknown (the hub was down): they get the
        # whole grace from now to come back.
        for row in tx.agents(online_only=True):
            row.online = False
            row.last_seen_at = tx.now
            row.replica_id = ""
            tx.put_agent(row)
        _reset_deadlines(tx, None)
        return Outcome()


def _offline_since(tx: StateTx, row: CollaborationRow) -> datetime | None:
    """When the session's partner that is offline (the earlier, if both) was last seen."""
    seen = []
    for agent_id in (row.initiator_id, row.target_id):
        agent = tx.agent(agent_id)
        if agent is None:
            seen.append(tx.now)
        elif not agent.online:
            seen.append(agent.last_seen_at)
    return min(seen, default=None)


def _set_deadline(tx: StateTx, row: CollaborationRow) -> None:
    """The one place a deadline is set: the state's TTL from the session's last step,
    but no later than the grace after an offline partner was last seen."""
    row.expires_at = tx.policy.deadline(row.state, row.updated_at, _offline_since(tx, row))


def _reset_deadlines(tx: StateTx, agent_id: str | None) -> None:
    """Recompute the deadlines of `agent_id`'s open sessions (None: every open session)
    after a change of presence."""
    # Only those not yet due: a session already due stays due, coming back too late
    # revives nothing.
    for row in tx.open_collaborations(agent_id):
        _set_deadline(tx, row)
        tx.put_collaboration(row)


# --- sharing ----------------------------------------------------------------


@dataclass
class ShareArtifact:
    agent_id: str
    message_id: str
    artifact: pb.Artifact  # content and kind set; the hub stamps the rest
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        outcome = Outcome()
        outcome.resource_id = store_artifact(tx, outcome, self.agent_id, self.artifact)
        return outcome


# --- features ---------------------------------------------------------------


@dataclass
class RequestFeature:
    agent_id: str
    message_id: str
    request: pb.RequestFeature
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        agents = tx.agents()
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
        seq = emit(
            tx,
            outcome,
            self.agent_id,
            recipients,
            feature_requested=pb.FeatureRequested(request=info),
        )
        tx.put_feature_request(
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

    def apply(self, tx: StateTx) -> Outcome:
        request = tx.feature_request(self.delivery.request_id)
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
        earlier = tx.delivery_by(request.request_id, self.agent_id)
        if earlier is not None:
            raise StatusError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"you already delivered feature request {request.request_id} "
                f"(artifact {earlier}); an agent delivers a request once",
            )
        limit = tx.policy.max_deliveries_per_request
        if request.delivery_count >= limit:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"feature request {request.request_id} already has {limit} deliveries "
                "(the limit per request)",
            )
        outcome = Outcome()
        artifact = stamp(
            tx,
            pb.Artifact(kind=pb.ARTIFACT_KIND_OS_COMPONENT, os_component=self.delivery.component),
            self.agent_id,
        )
        seq = emit(
            tx,
            outcome,
            self.agent_id,
            frozenset({request.requester_id}),
            feature_delivered=pb.FeatureDelivered(request_id=request.request_id, artifact=artifact),
        )
        add_artifact(tx, artifact, seq, frozenset({request.requester_id, self.agent_id}))
        tx.put_delivery(
            FeatureDeliveryRow(
                artifact_id=artifact.artifact_id,
                request_id=request.request_id,
                deliverer_id=self.agent_id,
                created_at=tx.now,
            )
        )
        request.delivery_count += 1
        tx.put_feature_request(request)
        outcome.resource_id = artifact.artifact_id
        return outcome


# --- collaborations ---------------------------------------------------------


def _check_taken_on(tx: StateTx, agent_id: str) -> None:
    """An agent's own budget: sessions it proposed and that are open, or that it accepted.
    Proposals made to it are not in it, so nobody else can fill it."""
    limit = tx.policy.max_open_per_agent
    # Two disjoint sets: nobody proposes to itself.
    taken_on = tx.count_open(initiator=agent_id) + tx.count_open(
        target=agent_id, state=State.COLLABORATION_STATE_ACTIVE
    )
    if taken_on >= limit:
        raise StatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"agent {agent_id} already has {limit} open collaborations it proposed or accepted "
            "(the limit per agent); one must end first",
        )


def _check_proposal_limits(tx: StateTx, initiator: str, target: str) -> None:
    """Limits that protect the target: one proposer holds at most `max_open_per_pair` of
    its sessions, and unanswered proposals to it are bounded."""
    _check_taken_on(tx, initiator)
    pair_limit = tx.policy.max_open_per_pair
    pair = tx.count_open(initiator=initiator, target=target) + tx.count_open(
        initiator=target, target=initiator
    )
    if pair >= pair_limit:
        raise StatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{initiator} and {target} already have {pair_limit} open collaborations together "
            "(the limit per pair of agents); one must end first",
        )
    incoming_limit = tx.policy.max_incoming_proposals
    incoming = tx.count_open(target=target, state=State.COLLABORATION_STATE_PROPOSED)
    if incoming >= incoming_limit:
        raise StatusError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"agent {target} already has {incoming_limit} unanswered proposals "
            "(the limit of proposals waiting for one agent); try again later",
        )


def _notify_partners(tx: StateTx, outcome: Outcome, sender: str, row: CollaborationRow) -> None:
    emit(
        tx,
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

    def apply(self, tx: StateTx) -> Outcome:
        target = self.proposal.target_agent_id
        if target == self.agent_id:
            raise failed_precondition("you cannot propose a collaboration to yourself")
        target_row = tx.agent(target)
        if target_row is None:
            raise not_found(f"agent {target}")
        initiator_row = tx.agent(self.agent_id)
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
        tx.put_collaboration(row)
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

    def apply(self, tx: StateTx) -> Outcome:
        row = tx.collaboration(self.session_id)
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
            row.result_artifact_id = store_artifact(tx, outcome, self.agent_id, artifact)
            row.progress = 1.0
            outcome.resource_id = row.result_artifact_id
        tx.put_collaboration(row)
        _notify_partners(tx, outcome, self.agent_id, row)
        return outcome


@dataclass
class ExpireDue:
    """The hub's own step: end open sessions whose deadline has passed."""

    batch_limit: int = 500
    agent_id: str = ""
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        outcome = Outcome()
        for row in tx.due_collaborations(self.batch_limit):
            offline = next(
                (
                    agent_id
                    for agent_id in (row.initiator_id, row.target_id)
                    if not (agent := tx.agent(agent_id)) or not agent.online
                ),
                None,
            )
            row.end_reason = collab.expiry_reason(row.state, offline)
            row.state = State.COLLABORATION_STATE_EXPIRED
            row.updated_at = tx.now
            row.expires_at = None
            tx.put_collaboration(row)
            _notify_partners(tx, outcome, "", row)
        return outcome


# --- validation -------------------------------------------------------------

# Claimable jobs one claim looks at per round, and rounds at most: a claim's work is bounded
# even when it must first give up on many components whose every lease expired.
CLAIM_SCAN = 16
CLAIM_ROUNDS = 4


def _lease_id(artifact_id: str, attempt: int) -> str:
    """The artifact id first (so a verdict finds its job by primary key), then the attempt
    and a random part: a lease cannot be guessed from the artifact id alone."""
    return f"{artifact_id}:{attempt}:{secrets.token_hex(6)}"


def artifact_of_lease(lease_id: str) -> str:
    return lease_id.split(":", 1)[0]


def _record_verdict(
    tx: StateTx,
    outcome: Outcome,
    sender: str,
    job: ValidationJobRow,
    artifact: pb.Artifact,
    verdict: pb.ValidationVerdict,
) -> None:
    """Store the verdict with the artifact, end the job, and tell the agents: a delivery's
    verdict goes to its requester and deliverer only; a share's to those whose subscription
    matches the artifact (its kinds and specializations), as its share did."""
    verdict.validator_id = sender
    verdict.validate_time.CopyFrom(tx.now_pb)
    artifact.verdict.CopyFrom(verdict)
    artifact.validation_state = verdict.state
    tx.put_artifact(artifact)
    content = getattr(artifact, artifact.WhichOneof("content") or "code_component")
    seq = emit(
        tx,
        outcome,
        sender,
        frozenset(job.audience.split("\n")) if job.audience else None,
        about=pb.HubEvent(sender_id=artifact.contributor_id, artifact_shared=artifact),
        artifact_validated=pb.ArtifactValidated(
            artifact_id=artifact.artifact_id,
            contributor_id=artifact.contributor_id,
            kind=artifact.kind,
            component_id=content.component_id,
            verdict=verdict,
        ),
    )
    job.done = True
    job.verdict_seq = seq
    tx.put_validation_job(job)
    outcome.resource_id = artifact.artifact_id


@dataclass
class ClaimValidation:
    """A validator takes the oldest claimable component: a lease for `lease_ttl` seconds.
    A component whose `max_attempts` leases all expired gets the hub's own ERROR verdict
    instead of a fourth validator to kill."""

    agent_id: str
    lease_ttl: float
    max_attempts: int
    max_leases: int = 4  # unexpired leases one validator may hold at once
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        held = tx.leases_held(self.agent_id)
        if held >= self.max_leases:
            raise StatusError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"validator {self.agent_id} already holds {held} leases (the limit per "
                "validator); submit their verdicts, or let them expire, first",
            )
        outcome = Outcome()
        for _ in range(CLAIM_ROUNDS):
            jobs = tx.claimable_jobs(CLAIM_SCAN)
            if not jobs:
                break
            for job in jobs:
                artifact = tx.artifact(job.artifact_id)
                if artifact is None:  # cannot happen while artifacts are never deleted
                    job.done = True
                    tx.put_validation_job(job)
                    continue
                if job.attempts >= self.max_attempts:
                    verdict = pb.ValidationVerdict(
                        state=pb.VALIDATION_STATE_ERROR,
                        diagnostics=(
                            f"no validator returned a verdict: {job.attempts} lease(s) expired "
                            f"(the last held by {job.validator_id})"
                        ),
                    )
                    _record_verdict(tx, outcome, "", job, artifact, verdict)
                    continue
                job.attempts += 1
                job.lease_id = _lease_id(job.artifact_id, job.attempts)
                job.validator_id = self.agent_id
                job.available_at = tx.now + timedelta(seconds=self.lease_ttl)
                tx.put_validation_job(job)
                lease = pb.ValidationLease(
                    lease_id=job.lease_id, artifact=artifact, attempt=job.attempts
                )
                lease.expire_time.FromDatetime(job.available_at)
                outcome.lease = lease.SerializeToString()
                outcome.resource_id = job.artifact_id
                return outcome
        outcome.retry_at = tx.next_available()
        return outcome


@dataclass
class SubmitVerdict:
    """A validator's verdict on the component it holds a lease on (checked by validation)."""

    agent_id: str
    lease_id: str
    verdict: pb.ValidationVerdict
    message_id: str = ""
    fingerprint: bytes = b""

    def apply(self, tx: StateTx) -> Outcome:
        artifact_id = artifact_of_lease(self.lease_id)
        job = tx.validation_job(artifact_id)
        if job is None or not job.lease_id:
            raise not_found(f"lease {self.lease_id}")
        mine = job.lease_id == self.lease_id and job.validator_id == self.agent_id
        if job.done:
            if mine:  # a resend (e.g. after UNAVAILABLE): the first answer
                return Outcome(seq=job.verdict_seq, resource_id=artifact_id, duplicate=True)
            raise failed_precondition(
                f"component {artifact_id} already has its verdict; lease {self.lease_id} is over"
            )
        if job.lease_id != self.lease_id:
            raise failed_precondition(
                f"lease {self.lease_id} expired and component {artifact_id} was leased again "
                f"(attempt {job.attempts}); this verdict is refused"
            )
        if job.validator_id != self.agent_id:
            raise permission_denied(f"lease {self.lease_id} is not yours")
        if job.available_at <= tx.now:
            raise failed_precondition(
                f"lease {self.lease_id} expired at {job.available_at.isoformat()}; the "
                "component goes to the next validator that claims, and this verdict is refused"
            )
        artifact = tx.artifact(artifact_id)
        if artifact is None:
            raise not_found(f"artifact {artifact_id}")
        outcome = Outcome()
        verdict = pb.ValidationVerdict()
        verdict.CopyFrom(self.verdict)
        _record_verdict(tx, outcome, self.agent_id, job, artifact, verdict)
        return outcome

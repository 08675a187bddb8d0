"""Database tables (SQLModel). Protobuf bodies are stored as bytes beside the
columns that queries filter on, so a row is served without re-assembling it."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

from generated.kernelhub.v1 import hub_pb2 as pb

from .roles import Role, to_pb


def utcnow() -> datetime:
    return datetime.now(UTC)


_id_lock = threading.Lock()
_last_id = (0, 0)  # (milliseconds, low bits) of the newest id


def new_id(prefix: str) -> str:
    """Time-ordered id: 48-bit milliseconds + 64 bits, random for the first id of a
    millisecond and incremented after that (ULID's monotonic mode), so ids sort in
    creation order even within a millisecond. Append-mostly primary-key inserts are
    also several times faster than random UUIDs."""
    global _last_id
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_id[0]:
            ms, low = _last_id[0], _last_id[1] + 1
        else:  # ids are not secrets: no system call (it would let go of the GIL) per id
            low = random.getrandbits(63)
        _last_id = (ms, low)
    return f"{prefix}_{ms:012x}{low:016x}"


class AgentRow(SQLModel, table=True):
    __tablename__ = "agent"
    agent_id: str = Field(primary_key=True, max_length=128)
    specialization: int = 0
    capabilities: str = ""  # newline-separated
    version: str = ""
    online: bool = False
    last_seen_at: datetime = Field(default_factory=utcnow)
    created_at: datetime = Field(default_factory=utcnow)
    # Schema revision 0007 (replicas): the replica whose stream made it online ("" for a
    # single hub, or offline), and the presence revision of its last change, hub-wide
    # increasing (allocated under the log's lock), which replicas follow the roster by.
    replica_id: str = Field(default="", max_length=64, index=True)
    presence_rev: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, index=True))


class ReplicaRow(SQLModel, table=True):
    """A live replica's lease (schema revision 0007): renewed every third of
    `replica_lease`; one expired is dead to the others, who mark its agents offline."""

    __tablename__ = "replica"
    replica_id: str = Field(primary_key=True, max_length=64)
    expires_at: datetime  # by the database's clock (`now()`), as every lease comparison
    # Retention across replicas: every event up to it may be pruned as far as this replica's
    # readers go (it already refuses resumes below it); the leader prunes to the minimum.
    prunable_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    started_at: datetime = Field(default_factory=utcnow)


class LeaderRow(SQLModel, table=True):
    """The one leader lease (schema revision 0007): its holder runs the hub-wide jobs."""

    __tablename__ = "leader"
    id: int = Field(primary_key=True)
    replica_id: str = Field(max_length=64)
    expires_at: datetime


class TokenRow(SQLModel, table=True):
    __tablename__ = "token"
    token_id: str = Field(primary_key=True, max_length=64)
    agent_id: str = Field(index=True, max_length=128)
    token_hash: str = Field(unique=True, max_length=64)  # sha256 hex; plaintext is never stored
    role: str = Field(default="agent", max_length=16)  # a roles.Role value
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


class EventRow(SQLModel, table=True):
    """The event log: one row per hub event, `seq` global and increasing."""

    __tablename__ = "event"
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    sender_id: str = Field(max_length=128)
    # True: every agent but the sender receives it; False: only event_recipient rows.
    broadcast: bool
    # What it is about (`subscriptions.Tags`, schema revision 0004), so a replay filters
    # by subscription in SQL: the EventKind, the artifact kind, specializations as bits.
    kind: int = 0
    artifact_kind: int = 0
    spec_mask: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # serialized HubEvent


class EventRecipientRow(SQLModel, table=True):
    __tablename__ = "event_recipient"
    __table_args__ = (Index("ix_event_recipient_agent_seq", "agent_id", "seq"),)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    agent_id: str = Field(primary_key=True, max_length=128)


class ReceivedMessageRow(SQLModel, table=True):
    """Idempotency ledger: a (agent, message_id) seen before gets its old receipt back."""

    __tablename__ = "received_message"
    # Retention forgets the oldest ids first (schema revision 0005).
    __table_args__ = (Index("ix_received_message_created_at", "created_at"),)
    agent_id: str = Field(primary_key=True, max_length=128)
    message_id: str = Field(primary_key=True, max_length=128)
    seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    resource_id: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    # Of the message's body (schema revision 0002): the same message_id with another body is
    # refused. NULL for rows written before it: their reuse stays a plain duplicate.
    fingerprint: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class ArtifactRow(SQLModel, table=True):
    __tablename__ = "artifact"
    __table_args__ = (
        Index("ix_artifact_kind_seq", "kind", "seq"),
        Index("ix_artifact_contributor_seq", "contributor_id", "seq"),
        Index("ix_artifact_specialization_seq", "specialization", "seq"),
        Index("ix_artifact_validation_state_seq", "validation_state", "seq"),
    )
    artifact_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, unique=True, nullable=False))
    kind: int
    contributor_id: str = Field(max_length=128)
    specialization: int = 0
    name: str = ""
    # A pb.ValidationState (schema revision 0006): ListArtifacts filters on it.
    validation_state: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    created_at: datetime = Field(default_factory=utcnow)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # serialized Artifact


class ValidationJobRow(SQLModel, table=True):
    """The validation queue (schema revision 0006): one row per shared component, claimable
    once `available_at` has passed (at its share; again when a lease expires) until done."""

    __tablename__ = "validation_job"
    __table_args__ = (
        Index("ix_validation_job_done_available", "done", "available_at", "seq"),
        Index("ix_validation_job_validator_done", "validator_id", "done"),
    )
    artifact_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))  # the share's: oldest first
    done: bool = False
    available_at: datetime = Field(default_factory=utcnow)  # share time, then lease expiry
    attempts: int = 0  # leases given
    lease_id: str = Field(default="", max_length=64)  # the latest lease
    validator_id: str = Field(default="", max_length=128)  # who holds (held) it
    verdict_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    # Who hears the verdict: empty for a share (subscribers to such artifacts), else the
    # agents its event went to, newline-separated (a feature delivery's requester and
    # deliverer: a private exchange stays private).
    audience: str = Field(default="", max_length=260)
    created_at: datetime = Field(default_factory=utcnow)


class FeatureRequestRow(SQLModel, table=True):
    __tablename__ = "feature_request"
    request_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, unique=True, nullable=False))
    requester_id: str = Field(index=True, max_length=128)
    feature: str
    delivery_count: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # FeatureRequestInfo


class FeatureDeliveryRow(SQLModel, table=True):
    __tablename__ = "feature_delivery"
    artifact_id: str = Field(primary_key=True, max_length=64)
    request_id: str = Field(index=True, max_length=64)
    deliverer_id: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow)


class CollaborationRow(SQLModel, table=True):
    __tablename__ = "collaboration"
    __table_args__ = (
        Index("ix_collaboration_initiator", "initiator_id"),
        Index("ix_collaboration_target", "target_id"),
        Index("ix_collaboration_state_expires", "state", "expires_at"),
    )
    session_id: str = Field(primary_key=True, max_length=64)
    initiator_id: str = Field(max_length=128)
    target_id: str = Field(max_length=128)
    type: int
    description: str = ""
    state: int
    progress: float = 0.0
    last_note: str = ""
    end_reason: str = ""
    result_artifact_id: str = ""
    initiator_specialization: int = 0
    target_specialization: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None


def capabilities_of(row: AgentRow) -> list[str]:
    return row.capabilities.split("\n") if row.capabilities else []


def agent_to_proto(row: AgentRow) -> pb.AgentInfo:
    info = pb.AgentInfo(
        agent_id=row.agent_id,
        specialization=row.specialization,  # type: ignore[arg-type]
        capabilities=capabilities_of(row),
        version=row.version,
        online=row.online,
    )
    info.last_seen_time.FromDatetime(row.last_seen_at)
    return info


def collaboration_to_proto(row: CollaborationRow) -> pb.Collaboration:
    collab = pb.Collaboration(
        session_id=row.session_id,
        initiator_id=row.initiator_id,
        target_id=row.target_id,
        type=row.type,  # type: ignore[arg-type]
        description=row.description,
        state=row.state,  # type: ignore[arg-type]
        progress=row.progress,
        last_note=row.last_note,
        end_reason=row.end_reason,
        result_artifact_id=row.result_artifact_id,
        initiator_specialization=row.initiator_specialization,  # type: ignore[arg-type]
        target_specialization=row.target_specialization,  # type: ignore[arg-type]
    )
    collab.create_time.FromDatetime(row.created_at)
    collab.update_time.FromDatetime(row.updated_at)
    if row.expires_at is not None:
        collab.expire_time.FromDatetime(row.expires_at)
    return collab


def token_to_proto(row: TokenRow) -> pb.TokenInfo:
    """A token as ListTokens shows it: everything but its hash."""
    info = pb.TokenInfo(token_id=row.token_id, agent_id=row.agent_id, role=to_pb(Role(row.role)))
    info.create_time.FromDatetime(row.created_at)
    if row.expires_at is not None:
        info.expire_time.FromDatetime(row.expires_at)
    if row.revoked_at is not None:
        info.revoke_time.FromDatetime(row.revoked_at)
    return info


def feature_request_to_proto(row: FeatureRequestRow) -> pb.FeatureRequestInfo:
    info = pb.FeatureRequestInfo.FromString(row.body)
    info.delivery_count = row.delivery_count
    return info


def artifact_row(artifact: pb.Artifact, seq: int, now: datetime) -> dict[str, Any]:
    """The artifact table's columns for a stamped artifact (queries filter on them)."""
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
        "validation_state": artifact.validation_state,
        "created_at": now,
        "body": artifact.SerializeToString(),
    }

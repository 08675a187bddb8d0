"""What a committed command answers with: the result types the store, the committer, the
router and the Connect session share (so none of them needs the domain rules)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from generated.kernelhub.v1 import hub_pb2 as pb

from .subscriptions import Tags


@dataclass(frozen=True)
class RoutedEvent:
    """A committed event and its audience: `recipients`, or (None) every agent but the sender."""

    event: pb.HubEvent
    recipients: frozenset[str] | None
    tags: Tags = field(default_factory=Tags)


@dataclass
class Outcome:
    """What a committed command answers with: the receipt's fields and the events to route."""

    seq: int = 0
    resource_id: str = ""
    duplicate: bool = False
    events: list[RoutedEvent] = field(default_factory=list)
    # A ClaimValidation's answer: the serialized ValidationLease it took (empty: none), and
    # when (None: never, without a new share) the next one may become claimable.
    lease: bytes = b""
    retry_at: datetime | None = None
    # AgentOnline's answer: the agent as stored (its connect time), for presence.
    agent: pb.AgentInfo | None = None
    # AgentOnline's answer: the presence revision its row took (replicas compare these, never
    # the clocks of different hosts).
    presence_rev: int = 0
    # ExpireReplicas: agents of expired replicas are still to be marked offline.
    more: bool = False

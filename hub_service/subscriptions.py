"""Subscriptions: what a stream asked to receive (`Filter`), what each event is about
(`Tags`, stored beside it in the log), and whether the one wants the other.

The router indexes live streams by these filters and the stores turn them into a query of
the log, so live delivery and replay choose the same events. Events addressed to an agent
(recipients) are not subject to any filter: they always come.
"""

from __future__ import annotations

from dataclasses import dataclass

from generated.kernelhub.v1 import hub_pb2 as pb

ARTIFACTS = pb.EVENT_KIND_ARTIFACTS
FEATURE_REQUESTS = pb.EVENT_KIND_FEATURE_REQUESTS
COLLABORATIONS = pb.EVENT_KIND_COLLABORATIONS
PRESENCE = pb.EVENT_KIND_PRESENCE
# The kinds a broadcast event in the log can have (presence is never logged).
BROADCAST_KINDS = (ARTIFACTS, FEATURE_REQUESTS)

# The most terms per field of a Subscription (contributors: the hub's list limit).
MAX_EVENT_KINDS = 4
MAX_ARTIFACT_KINDS = 3
MAX_SPECIALIZATIONS = 8

_KIND_OF_BODY = {
    "artifact_shared": ARTIFACTS,
    "feature_requested": FEATURE_REQUESTS,
    "feature_delivered": FEATURE_REQUESTS,
    "collaboration_updated": COLLABORATIONS,
    "agent_joined": PRESENCE,  # logged by older hubs only
    "agent_left": PRESENCE,
}


def spec_bit(specialization: int) -> int:
    """A specialization as a bit of a mask (0 for UNSPECIFIED)."""
    return 1 << specialization if specialization > 0 else 0


@dataclass(frozen=True)
class Tags:
    """What an event is about, as filters see it: stored beside the event (columns of the
    log), so a replay filters in the store, not by decoding every event."""

    kind: int = 0  # an EventKind (0: unknown, a row older than subscriptions)
    artifact_kind: int = 0
    spec_mask: int = 0  # the content's specializations and the contributor's, as bits
    contributor: str = ""
    # Of a broadcast event, agents that get it whatever they subscribed to (a verdict's
    # contributor), kept as recipient rows beside the broadcast.
    also_to: frozenset[str] = frozenset()


def tags_of(event: pb.HubEvent, contributor_specialization: int) -> Tags:
    body = event.WhichOneof("body") or ""
    kind = _KIND_OF_BODY.get(body, 0)
    mask = spec_bit(contributor_specialization)
    artifact_kind = 0
    if body == "artifact_shared":
        artifact = event.artifact_shared
        artifact_kind = artifact.kind
        content = artifact.WhichOneof("content")
        if content == "os_component":
            for spec in artifact.os_component.specializations:
                mask |= spec_bit(spec)
        elif content is not None:
            mask |= spec_bit(getattr(artifact, content).specialization)
    elif body == "feature_requested":
        mask |= spec_bit(event.feature_requested.request.requirements.compatibility)
    return Tags(kind, artifact_kind, mask, event.sender_id)


@dataclass(frozen=True)
class Filter:
    """A validated Subscription: each field empty (0 for the mask) matches everything."""

    kinds: frozenset[int] = frozenset()
    artifact_kinds: frozenset[int] = frozenset()
    spec_mask: int = 0
    contributors: frozenset[str] = frozenset()

    @classmethod
    def of(cls, subscription: pb.Subscription) -> Filter:
        mask = 0
        for spec in subscription.specializations:
            mask |= spec_bit(spec)
        return cls(
            frozenset(subscription.event_kinds),
            frozenset(subscription.artifact_kinds),
            mask,
            frozenset(subscription.contributors),
        )

    def wants(self, kind: int) -> bool:
        return not self.kinds or kind in self.kinds

    @property
    def presence(self) -> bool:
        return self.wants(PRESENCE)

    def broadcast_kinds(self) -> tuple[int, ...]:
        """The kinds of logged broadcast event this filter can match."""
        return tuple(k for k in BROADCAST_KINDS if self.wants(k))

    def matches(self, tags: Tags) -> bool:
        """Whether a broadcast event with these tags is wanted."""
        if tags.kind not in BROADCAST_KINDS or not self.wants(tags.kind):
            return False
        if (
            self.artifact_kinds
            and tags.kind == ARTIFACTS
            and tags.artifact_kind not in self.artifact_kinds
        ):
            return False
        if self.spec_mask and not self.spec_mask & tags.spec_mask:
            return False
        return not self.contributors or tags.contributor in self.contributors


EVERYTHING = Filter()

"""The collaboration state machine: which step may move a session where, and who may take it.

PROPOSED -> ACTIVE -> COMPLETED, PROPOSED -> DECLINED, PROPOSED/ACTIVE -> EXPIRED.
Pure functions: the store applies the result inside its transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from generated.kernelhub.v1 import hub_pb2 as pb

from .errors import failed_precondition, permission_denied

State = pb.CollaborationState
OPEN_STATES = (State.COLLABORATION_STATE_PROPOSED, State.COLLABORATION_STATE_ACTIVE)


class Step(enum.Enum):
    ACCEPT = "accept"
    DECLINE = "decline"
    PROGRESS = "report progress on"
    COMPLETE = "complete"


# (step, from state) -> to state
_TRANSITIONS: dict[tuple[Step, int], int] = {
    (Step.ACCEPT, State.COLLABORATION_STATE_PROPOSED): State.COLLABORATION_STATE_ACTIVE,
    (Step.DECLINE, State.COLLABORATION_STATE_PROPOSED): State.COLLABORATION_STATE_DECLINED,
    (Step.PROGRESS, State.COLLABORATION_STATE_ACTIVE): State.COLLABORATION_STATE_ACTIVE,
    (Step.COMPLETE, State.COLLABORATION_STATE_ACTIVE): State.COLLABORATION_STATE_COMPLETED,
}
_TARGET_ONLY = {Step.ACCEPT, Step.DECLINE}


@dataclass(frozen=True)
class Policy:
    """Deadlines that keep sessions from waiting forever, and limits that keep one agent
    from filling another's budget (each crossing is RESOURCE_EXHAUSTED naming the limit)."""

    proposal_ttl: timedelta = timedelta(seconds=120)  # PROPOSED must be answered within
    activity_ttl: timedelta = timedelta(seconds=300)  # ACTIVE must see progress within
    partner_offline_grace: timedelta = timedelta(seconds=30)  # after a partner disconnects
    # Sessions an agent has taken on: proposed by it and not ended, or accepted by it.
    # Proposals made *to* it do not count until it accepts them.
    max_open_per_agent: int = 16
    max_open_per_pair: int = 2  # open sessions between the same two agents, either way
    max_incoming_proposals: int = 64  # unanswered proposals to one agent, from anyone
    # Not a collaboration limit, but the domain's limits travel together with each commit.
    max_deliveries_per_request: int = 32  # deliveries of one feature request

    def deadline(
        self, state: int, since: datetime, offline_since: datetime | None = None
    ) -> datetime | None:
        """When a session in `state` since `since` expires: its TTL, but no later than
        the grace after `offline_since` (when a partner that is offline was last seen)."""
        if state == State.COLLABORATION_STATE_PROPOSED:
            due = since + self.proposal_ttl
        elif state == State.COLLABORATION_STATE_ACTIVE:
            due = since + self.activity_ttl
        else:
            return None
        if offline_since is not None:
            due = min(due, offline_since + self.partner_offline_grace)
        return due


def advance(
    *, session_id: str, state: int, initiator: str, target: str, actor: str, step: Step
) -> int:
    """The state after `actor` takes `step`, or the StatusError that says why not."""
    if actor not in (initiator, target):
        raise permission_denied(f"{actor} is not a partner of collaboration {session_id}")
    if step in _TARGET_ONLY and actor != target:
        raise permission_denied(
            f"only the target ({target}) may {step.value} collaboration {session_id}"
        )
    new_state = _TRANSITIONS.get((step, state))
    if new_state is None:
        raise failed_precondition(
            f"cannot {step.value} collaboration {session_id}: it is {State.Name(State.ValueType(state))}"
        )
    return new_state


def expiry_reason(state: int, offline_partner: str | None) -> str:
    if offline_partner:
        return f"partner {offline_partner} went offline"
    if state == State.COLLABORATION_STATE_PROPOSED:
        return "the proposal was not answered in time"
    return "no progress was reported in time"


def is_open(state: int) -> bool:
    return state in OPEN_STATES

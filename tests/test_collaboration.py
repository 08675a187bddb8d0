"""Collaboration sessions through the stream: propose, accept, progress, complete, decline, expire."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.collaboration import Policy, Step, advance, expiry_reason, is_open
from hub_service.config import HubConfig
from hub_service.errors import StatusError

from .conftest import (
    WAIT,
    HubHarness,
    RawTrainer,
    hello,
    make_config,
    os_component,
    pattern,
    short_policy,
)

S = pb.CollaborationState
NOT_FOUND, PERMISSION_DENIED = 5, 7
RESOURCE_EXHAUSTED, FAILED_PRECONDITION = 8, 9


@pytest.fixture
def hub_config(request: pytest.FixtureRequest, database_url: str) -> HubConfig:
    """Default: deadlines far away. Tests pass Policy/config overrides with indirect params."""
    overrides: dict[str, Any] = dict(getattr(request, "param", {}))
    policy = short_policy(**overrides.pop("policy", {}))
    return make_config(database_url, policy=policy, **overrides)


def short(**policy: Any) -> pytest.MarkDecorator:
    """An indirect `hub_config` parameter: these Policy fields, and a fast reaper."""
    return pytest.mark.parametrize(
        "hub_config", [{"policy": policy, "reaper_interval": 0.2}], indirect=True
    )


async def connect_pair(harness: HubHarness) -> tuple[RawTrainer, RawTrainer]:
    a = await harness.connect("AI_Node_1", hello("AI_Node_1", pb.SPECIALIZATION_NETWORKING))
    b = await harness.connect(
        "AI_Node_2",
        hello("AI_Node_2", pb.SPECIALIZATION_SECURITY, capabilities=["security_analysis"]),
    )
    return a, b


async def propose(initiator: RawTrainer, target: str, description: str = "secure transport") -> str:
    mid = await initiator.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id=target,
            type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
            description=description,
        )
    )
    receipt = await initiator.receipt(mid)
    assert receipt.resource_id.startswith("collab_") and receipt.seq > 0
    return receipt.resource_id


async def accept(target: RawTrainer, session_id: str) -> pb.Receipt:
    mid = await target.send(accept_collaboration=pb.AcceptCollaboration(session_id=session_id))
    return await target.receipt(mid)


async def updated(
    trainer: RawTrainer, session_id: str, state: int, **match: Any
) -> pb.Collaboration:
    event = await trainer.event(
        "collaboration_updated",
        collaboration__session_id=session_id,
        collaboration__state=state,
        **{f"collaboration__{k}": v for k, v in match.items()},
    )
    return event.collaboration_updated.collaboration


async def still_works(trainer: RawTrainer) -> None:
    """After a refused message the same stream accepts and stores a good one."""
    receipt = await trainer.receipt(
        await trainer.send(share_pattern=pb.SharePattern(pattern=pattern()))
    )
    assert receipt.seq > 0 and receipt.resource_id.startswith("art_")


def collaborative_component() -> pb.OsComponent:
    component = os_component("secure_channel")
    component.component_type = "collaborative_component"
    del component.specializations[:]
    component.specializations.extend([pb.SPECIALIZATION_NETWORKING, pb.SPECIALIZATION_SECURITY])
    component.attributes["origin"] = "pair"
    return component


# --- the happy path ----------------------------------------------------------


async def test_propose_accept_progress_complete(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    c = await harness.connect("AI_Node_3", hello("AI_Node_3", pb.SPECIALIZATION_AUDIO))

    proposal_mid = await a.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_2",
            type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
            description="secure transport",
        )
    )
    proposed_receipt = await a.receipt(proposal_mid)
    session_id = proposed_receipt.resource_id
    assert session_id.startswith("collab_")
    for partner in (a, b):
        event = await partner.event("collaboration_updated", collaboration__session_id=session_id)
        assert event.seq == proposed_receipt.seq
        assert event.sender_id == "AI_Node_1"
        collab = event.collaboration_updated.collaboration
        assert collab.state == S.COLLABORATION_STATE_PROPOSED
        assert (collab.initiator_id, collab.target_id) == ("AI_Node_1", "AI_Node_2")
        assert collab.type == pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION
        assert collab.description == "secure transport"
        assert (
            collab.HasField("expire_time")
            and collab.expire_time.ToDatetime() > collab.create_time.ToDatetime()
        )

    accepted = await accept(b, session_id)
    assert accepted.resource_id == session_id and accepted.seq > proposed_receipt.seq
    for partner in (a, b):
        collab = await updated(partner, session_id, S.COLLABORATION_STATE_ACTIVE)
        assert collab.progress == 0.0 and collab.HasField("expire_time")

    progress_mid = await a.send(
        report_collaboration_progress=pb.ReportCollaborationProgress(
            session_id=session_id, progress=0.4, note="handshake done"
        )
    )
    progressed = await a.receipt(progress_mid)
    assert progressed.resource_id == session_id and progressed.seq > accepted.seq
    for partner in (a, b):
        collab = await updated(partner, session_id, S.COLLABORATION_STATE_ACTIVE, progress=0.4)
        assert collab.last_note == "handshake done"

    complete_mid = await b.send(
        complete_collaboration=pb.CompleteCollaboration(
            session_id=session_id, component=collaborative_component()
        )
    )
    completed = await b.receipt(complete_mid)
    artifact_id = completed.resource_id
    assert artifact_id.startswith("art_") and completed.seq > progressed.seq
    for partner in (a, b):
        collab = await updated(partner, session_id, S.COLLABORATION_STATE_COMPLETED)
        assert collab.result_artifact_id == artifact_id
        assert collab.progress == 1.0
        assert not collab.HasField("expire_time")

    # The component is stored as an OS component that names its session ...
    stored = (
        await harness.query("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id))
    ).artifact
    assert stored.kind == pb.ARTIFACT_KIND_OS_COMPONENT
    assert stored.contributor_id == "AI_Node_2"
    assert stored.os_component.name == "secure_channel"
    assert stored.os_component.attributes["collaboration_session_id"] == session_id
    assert stored.os_component.attributes["origin"] == "pair"
    assert list(stored.os_component.specializations) == [
        pb.SPECIALIZATION_NETWORKING,
        pb.SPECIALIZATION_SECURITY,
    ]
    # ... and shared with every other agent, but not echoed to the one who completed it.
    for other in (a, c):
        shared = await other.event("artifact_shared", artifact_id=artifact_id)
        assert shared.artifact_shared == stored
        assert shared.sender_id == "AI_Node_2"
    assert not any(e.WhichOneof("body") == "artifact_shared" for e in b.events)
    # The bystander heard nothing about the session itself (a later share is the barrier).
    barrier = await a.receipt(await a.send(share_pattern=pb.SharePattern(pattern=pattern())))
    await c.until_seq(barrier.seq)
    assert not any(e.WhichOneof("body") == "collaboration_updated" for e in c.events)

    listed = await harness.query(
        "ListCollaborations", pb.ListCollaborationsRequest(agent_id="AI_Node_1")
    )
    assert [x.session_id for x in listed.collaborations] == [session_id]
    final = listed.collaborations[0]
    assert final.state == S.COLLABORATION_STATE_COMPLETED
    assert final.result_artifact_id == artifact_id
    assert final.last_note == "handshake done"
    only_completed = await harness.query(
        "ListCollaborations",
        pb.ListCollaborationsRequest(state=S.COLLABORATION_STATE_COMPLETED),
    )
    assert [x.session_id for x in only_completed.collaborations] == [session_id]
    none_active = await harness.query(
        "ListCollaborations", pb.ListCollaborationsRequest(state=S.COLLABORATION_STATE_ACTIVE)
    )
    assert list(none_active.collaborations) == []


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("busy with the scheduler", "busy with the scheduler"), ("", "declined by AI_Node_2")],
)
async def test_decline_ends_the_session_with_a_reason(
    harness: HubHarness, reason: str, expected: str
) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    mid = await b.send(
        decline_collaboration=pb.DeclineCollaboration(session_id=session_id, reason=reason)
    )
    receipt = await b.receipt(mid)
    assert receipt.resource_id == session_id
    for partner in (a, b):
        collab = await updated(partner, session_id, S.COLLABORATION_STATE_DECLINED)
        assert collab.end_reason == expected
        assert not collab.HasField("expire_time")
    listed = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert [(x.session_id, x.state, x.end_reason) for x in listed.collaborations] == [
        (session_id, S.COLLABORATION_STATE_DECLINED, expected)
    ]
    # A declined session cannot be accepted any more.
    late = await b.error(
        await b.send(accept_collaboration=pb.AcceptCollaboration(session_id=session_id))
    )
    assert late.code == FAILED_PRECONDITION and "COLLABORATION_STATE_DECLINED" in late.message


# --- expiry --------------------------------------------------------------------


@short(proposal_ttl=timedelta(seconds=1))
async def test_unanswered_proposal_expires(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    for partner in (a, b):
        event = await partner.event(
            "collaboration_updated",
            collaboration__session_id=session_id,
            collaboration__state=S.COLLABORATION_STATE_EXPIRED,
        )
        assert event.sender_id == ""  # raised by the hub itself
        collab = event.collaboration_updated.collaboration
        assert collab.end_reason == "the proposal was not answered in time"
        assert not collab.HasField("expire_time")
    # Accepting after expiry is refused and the stream goes on.
    late = await b.error(
        await b.send(accept_collaboration=pb.AcceptCollaboration(session_id=session_id))
    )
    assert late.code == FAILED_PRECONDITION
    await still_works(b)
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert dict(stats.collaborations_by_state) == {"COLLABORATION_STATE_EXPIRED": 1}


@short(activity_ttl=timedelta(seconds=1))
async def test_active_session_without_progress_expires(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    await accept(b, session_id)
    for partner in (a, b):
        collab = await updated(partner, session_id, S.COLLABORATION_STATE_EXPIRED)
        assert collab.end_reason == "no progress was reported in time"
    listed = await harness.query(
        "ListCollaborations", pb.ListCollaborationsRequest(state=S.COLLABORATION_STATE_EXPIRED)
    )
    assert [x.session_id for x in listed.collaborations] == [session_id]


@short(partner_offline_grace=timedelta(seconds=1))
async def test_session_expires_when_a_partner_stays_offline(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    await accept(b, session_id)
    await updated(a, session_id, S.COLLABORATION_STATE_ACTIVE)
    await b.close()
    await a.left("AI_Node_2")
    collab = await updated(a, session_id, S.COLLABORATION_STATE_EXPIRED)
    assert collab.end_reason == "partner AI_Node_2 went offline"
    # The absent partner finds out when it comes back.
    back = await harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    collab = await updated(back, session_id, S.COLLABORATION_STATE_EXPIRED)
    assert collab.end_reason == "partner AI_Node_2 went offline"


# --- refusals ------------------------------------------------------------------


async def test_only_the_target_may_accept(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    error = await a.error(
        await a.send(accept_collaboration=pb.AcceptCollaboration(session_id=session_id))
    )
    assert (error.code, error.code_name) == (PERMISSION_DENIED, "PERMISSION_DENIED")
    assert "AI_Node_2" in error.message and session_id in error.message
    await still_works(a)
    # The session is untouched and the target can still accept it.
    await accept(b, session_id)
    await updated(a, session_id, S.COLLABORATION_STATE_ACTIVE)


async def test_a_stranger_cannot_touch_a_session(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    stranger = await harness.connect("AI_Node_3", hello("AI_Node_3", pb.SPECIALIZATION_AUDIO))
    session_id = await propose(a, "AI_Node_2")
    await accept(b, session_id)
    progress_mid = await stranger.send(
        report_collaboration_progress=pb.ReportCollaborationProgress(
            session_id=session_id, progress=0.9, note="not mine"
        )
    )
    error = await stranger.error(progress_mid)
    assert (error.code, error.code_name) == (PERMISSION_DENIED, "PERMISSION_DENIED")
    assert "AI_Node_3" in error.message and "not a partner" in error.message
    await still_works(stranger)
    listed = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert listed.collaborations[0].progress == 0.0 and listed.collaborations[0].last_note == ""


async def test_complete_a_proposed_session_is_failed_precondition(harness: HubHarness) -> None:
    a, _ = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    mid = await a.send(
        complete_collaboration=pb.CompleteCollaboration(
            session_id=session_id, component=collaborative_component()
        )
    )
    error = await a.error(mid)
    assert (error.code, error.code_name) == (FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert "COLLABORATION_STATE_PROPOSED" in error.message
    await still_works(a)
    # Nothing but the good share was stored.
    listed = await harness.query(
        "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_OS_COMPONENT)
    )
    assert list(listed.artifacts) == []


@pytest.mark.parametrize(
    "body",
    [
        {"accept_collaboration": pb.AcceptCollaboration(session_id="collab_nope")},
        {"decline_collaboration": pb.DeclineCollaboration(session_id="collab_nope")},
        {
            "report_collaboration_progress": pb.ReportCollaborationProgress(
                session_id="collab_nope", progress=0.5
            )
        },
    ],
    ids=["accept", "decline", "progress"],
)
async def test_unknown_session_is_not_found(harness: HubHarness, body: dict[str, Any]) -> None:
    a, _ = await connect_pair(harness)
    error = await a.error(await a.send(**body))
    assert (error.code, error.code_name) == (NOT_FOUND, "NOT_FOUND")
    assert "collab_nope" in error.message
    await still_works(a)


async def test_propose_to_an_unknown_agent_is_not_found(harness: HubHarness) -> None:
    a, _ = await connect_pair(harness)
    mid = await a.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_99", type=pb.COLLABORATION_TYPE_CODE_REVIEW
        )
    )
    error = await a.error(mid)
    assert (error.code, error.code_name) == (NOT_FOUND, "NOT_FOUND")
    assert "AI_Node_99" in error.message
    await still_works(a)
    listed = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert list(listed.collaborations) == []


async def test_propose_to_yourself_is_failed_precondition(harness: HubHarness) -> None:
    a, _ = await connect_pair(harness)
    mid = await a.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_1", type=pb.COLLABORATION_TYPE_CODE_REVIEW
        )
    )
    error = await a.error(mid)
    assert (error.code, error.code_name) == (FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert "yourself" in error.message
    await still_works(a)
    listed = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert list(listed.collaborations) == []


@short(max_open_per_agent=2)
async def test_open_sessions_per_agent_are_limited(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    c = await harness.connect("AI_Node_3", hello("AI_Node_3", pb.SPECIALIZATION_PERFORMANCE))
    first = await propose(a, "AI_Node_2", "one")
    await propose(a, "AI_Node_3", "two")

    # The initiator is at its limit ...
    over = await a.send(
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_2", type=pb.COLLABORATION_TYPE_CODE_REVIEW
        )
    )
    error = await a.error(over)
    assert (error.code, error.code_name) == (RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED")
    assert "AI_Node_1" in error.message and "2 open collaborations" in error.message
    await still_works(a)

    # ... but proposals to it do not count against it: C may propose, A may not accept yet.
    from_c = await propose(c, "AI_Node_1", "three")
    error = await a.error(
        await a.send(accept_collaboration=pb.AcceptCollaboration(session_id=from_c))
    )
    assert error.code == RESOURCE_EXHAUSTED and "AI_Node_1" in error.message
    assert "2 open collaborations" in error.message
    await still_works(a)

    # Ending a session frees a slot.
    await b.receipt(
        await b.send(decline_collaboration=pb.DeclineCollaboration(session_id=first, reason="no"))
    )
    await accept(a, from_c)
    listed = await harness.query(
        "ListCollaborations", pb.ListCollaborationsRequest(state=S.COLLABORATION_STATE_ACTIVE)
    )
    assert [x.session_id for x in listed.collaborations] == [from_c]


async def test_one_agent_cannot_flood_another_with_proposals(harness: HubHarness) -> None:
    attacker, victim = await connect_pair(harness)
    other = await harness.connect("AI_Node_3", hello("AI_Node_3", pb.SPECIALIZATION_PERFORMANCE))
    answers = [
        await attacker.answer(
            await attacker.send(
                propose_collaboration=pb.ProposeCollaboration(
                    target_agent_id="AI_Node_2", type=pb.COLLABORATION_TYPE_CODE_REVIEW
                )
            )
        )
        for _ in range(16)
    ]
    accepted = [a for a in answers if isinstance(a, pb.Receipt)]
    refused = [a for a in answers if isinstance(a, pb.RequestError)]
    assert len(accepted) == 2 and answers[:2] == accepted  # the per-pair limit
    for error in refused:
        assert error.code == RESOURCE_EXHAUSTED
        assert "AI_Node_1 and AI_Node_2" in error.message and "per pair" in error.message
    # The victim can still propose, and be proposed to, by anyone else; so can the attacker.
    await propose(victim, "AI_Node_3")
    await propose(other, "AI_Node_2")
    await propose(attacker, "AI_Node_3")


@short(max_incoming_proposals=2)
async def test_unanswered_proposals_to_one_agent_are_limited(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    c = await harness.connect("AI_Node_3", hello("AI_Node_3", pb.SPECIALIZATION_PERFORMANCE))
    d = await harness.connect("AI_Node_4", hello("AI_Node_4", pb.SPECIALIZATION_GRAPHICS))
    await propose(a, "AI_Node_2")
    await propose(c, "AI_Node_2")
    error = await d.error(
        await d.send(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id="AI_Node_2", type=pb.COLLABORATION_TYPE_CODE_REVIEW
            )
        )
    )
    assert error.code == RESOURCE_EXHAUSTED
    assert "AI_Node_2" in error.message and "2 unanswered proposals" in error.message
    await still_works(d)
    await propose(b, "AI_Node_4")  # the target's own proposals are not blocked


@pytest.mark.parametrize(
    "hub_config",
    [{"policy": {"proposal_ttl": timedelta(seconds=-1)}, "reaper_interval": 60}],
    indirect=True,
)
async def test_a_step_after_the_deadline_is_refused_before_the_reaper_runs(
    harness: HubHarness,
) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")  # due at once; the reaper is a minute away
    error = await b.error(
        await b.send(accept_collaboration=pb.AcceptCollaboration(session_id=session_id))
    )
    assert error.code == FAILED_PRECONDITION and "deadline" in error.message
    listed = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert listed.collaborations[0].state == S.COLLABORATION_STATE_PROPOSED
    await still_works(b)


# --- the state machine itself ----------------------------------------------------


INIT, TGT, STRANGER = "initiator", "target", "stranger"
ALL_STATES = [
    S.COLLABORATION_STATE_PROPOSED,
    S.COLLABORATION_STATE_ACTIVE,
    S.COLLABORATION_STATE_COMPLETED,
    S.COLLABORATION_STATE_DECLINED,
    S.COLLABORATION_STATE_EXPIRED,
]
ALLOWED: dict[tuple[Step, int, str], int] = {
    (Step.ACCEPT, S.COLLABORATION_STATE_PROPOSED, TGT): S.COLLABORATION_STATE_ACTIVE,
    (Step.DECLINE, S.COLLABORATION_STATE_PROPOSED, TGT): S.COLLABORATION_STATE_DECLINED,
    (Step.PROGRESS, S.COLLABORATION_STATE_ACTIVE, INIT): S.COLLABORATION_STATE_ACTIVE,
    (Step.PROGRESS, S.COLLABORATION_STATE_ACTIVE, TGT): S.COLLABORATION_STATE_ACTIVE,
    (Step.COMPLETE, S.COLLABORATION_STATE_ACTIVE, INIT): S.COLLABORATION_STATE_COMPLETED,
    (Step.COMPLETE, S.COLLABORATION_STATE_ACTIVE, TGT): S.COLLABORATION_STATE_COMPLETED,
}


@pytest.mark.parametrize("step", list(Step), ids=lambda s: s.name)
@pytest.mark.parametrize("state", ALL_STATES, ids=S.Name)
@pytest.mark.parametrize("actor", [INIT, TGT, STRANGER])
def test_state_machine(step: Step, state: int, actor: str) -> None:
    def run() -> int:
        return advance(
            session_id="s1", state=state, initiator=INIT, target=TGT, actor=actor, step=step
        )

    expected = ALLOWED.get((step, state, actor))
    if expected is not None:
        assert run() == expected
        return
    with pytest.raises(StatusError) as raised:
        run()
    if actor == STRANGER or (step in (Step.ACCEPT, Step.DECLINE) and actor == INIT):
        assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert S.Name(S.ValueType(state)) in raised.value.message


def test_policy_deadlines() -> None:
    policy = Policy(proposal_ttl=timedelta(seconds=5), activity_ttl=timedelta(seconds=7))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert policy.deadline(S.COLLABORATION_STATE_PROPOSED, now) == now + timedelta(seconds=5)
    assert policy.deadline(S.COLLABORATION_STATE_ACTIVE, now) == now + timedelta(seconds=7)
    for ended in ALL_STATES[2:]:
        assert policy.deadline(ended, now) is None
    # An offline partner caps it at the grace after it was last seen, never extends it.
    grace = Policy(partner_offline_grace=timedelta(seconds=3))
    left = now - timedelta(seconds=1)
    assert grace.deadline(S.COLLABORATION_STATE_ACTIVE, now, left) == now + timedelta(seconds=2)
    assert grace.deadline(S.COLLABORATION_STATE_PROPOSED, now, left) == now + timedelta(seconds=2)
    assert policy.deadline(S.COLLABORATION_STATE_PROPOSED, now, now) == now + timedelta(seconds=5)
    assert [s for s in ALL_STATES if is_open(s)] == ALL_STATES[:2]
    assert (
        expiry_reason(S.COLLABORATION_STATE_ACTIVE, "AI_Node_9") == "partner AI_Node_9 went offline"
    )


async def test_sessions_carry_both_partners_specializations(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    for trainer in (a, b):
        collab = await updated(trainer, session_id, pb.COLLABORATION_STATE_PROPOSED)
        assert collab.initiator_specialization == pb.SPECIALIZATION_NETWORKING
        assert collab.target_specialization == pb.SPECIALIZATION_SECURITY
    listed = await harness.query(
        "ListCollaborations", pb.ListCollaborationsRequest(agent_id="AI_Node_1")
    )
    assert listed.collaborations[0].target_specialization == pb.SPECIALIZATION_SECURITY


@short(max_open_per_pair=16)
async def test_a_trainer_gets_its_receipt_no_later_than_the_events_its_message_caused(
    harness: HubHarness,
) -> None:
    """The initiator is among a proposal's recipients: the event telling it about the new
    session must not arrive before the receipt for the proposal that made it."""
    a, _ = await connect_pair(harness)
    for round_ in range(12):  # under the open-session limit; the race is within one loop turn
        mid = await a.send(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id="AI_Node_2",
                type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
                description=f"round {round_}",
            )
        )
        receipt_at = event_at = None
        responses = 0
        while receipt_at is None or event_at is None:
            response = await asyncio.wait_for(a.call.read(), WAIT)
            assert response is not grpc.aio.EOF
            responses += 1
            if receipt_at is None and any(r.message_id == mid for r in response.receipts):
                receipt_at = responses
            if event_at is None and any(
                e.WhichOneof("body") == "collaboration_updated"
                and e.collaboration_updated.collaboration.description == f"round {round_}"
                for e in response.events
            ):
                event_at = responses
        assert receipt_at <= event_at, f"round {round_}: the event came before the receipt"


# --- the partner-offline rule, whichever partner and whatever the other does ---------


@short(partner_offline_grace=timedelta(seconds=1))
async def test_a_proposal_to_an_agent_already_offline_expires_after_the_grace(
    harness: HubHarness,
) -> None:
    a, b = await connect_pair(harness)
    await b.close()
    await a.left("AI_Node_2")
    session_id = await propose(a, "AI_Node_2")
    proposed = await updated(a, session_id, S.COLLABORATION_STATE_PROPOSED)
    # Due no later than the grace after the target was last seen, not after the proposal TTL.
    left = (await harness.query("ListAgents", pb.ListAgentsRequest())).agents
    last_seen = next(x.last_seen_time.ToDatetime() for x in left if x.agent_id == "AI_Node_2")
    assert proposed.expire_time.ToDatetime() <= last_seen + timedelta(seconds=1)
    collab = await updated(a, session_id, S.COLLABORATION_STATE_EXPIRED)
    assert collab.end_reason == "partner AI_Node_2 went offline"


@short(partner_offline_grace=timedelta(seconds=1))
async def test_progress_by_one_partner_does_not_keep_a_session_with_an_absent_one_alive(
    harness: HubHarness,
) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    await a.close()  # the initiator leaves ...
    await b.left("AI_Node_1")
    await accept(b, session_id)  # ... and the target accepts and keeps working
    deadline = asyncio.get_running_loop().time() + WAIT
    progress = 0.0
    while not any(
        e.WhichOneof("body") == "collaboration_updated"
        and e.collaboration_updated.collaboration.state == S.COLLABORATION_STATE_EXPIRED
        for e in b.events
    ):
        assert asyncio.get_running_loop().time() < deadline, "the session never expired"
        progress = min(progress + 0.01, 0.99)
        answer = await b.answer(
            await b.send(
                report_collaboration_progress=pb.ReportCollaborationProgress(
                    session_id=session_id, progress=progress
                )
            )
        )
        if isinstance(answer, pb.RequestError):  # expiring, or expired: the reaper says which
            assert answer.code == FAILED_PRECONDITION, answer
            break
        # Each progress report's event: its deadline never moves past the grace.
        collab = await updated(b, session_id, S.COLLABORATION_STATE_ACTIVE, progress=progress)
        assert collab.expire_time.ToDatetime() <= collab.update_time.ToDatetime() + timedelta(
            seconds=1
        )
        await asyncio.sleep(0.05)  # pacing only: a trainer reports now and then, not in a spin
    collab = await updated(b, session_id, S.COLLABORATION_STATE_EXPIRED)
    assert collab.end_reason == "partner AI_Node_1 went offline"


@short(partner_offline_grace=timedelta(seconds=30), activity_ttl=timedelta(seconds=60))
async def test_a_partner_back_in_time_gets_the_full_deadline_again(harness: HubHarness) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    await accept(b, session_id)
    active = await updated(a, session_id, S.COLLABORATION_STATE_ACTIVE)
    full = active.update_time.ToDatetime() + timedelta(seconds=60)
    assert active.expire_time.ToDatetime() == full
    await b.close()
    await a.left("AI_Node_2")
    [away] = (
        await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    ).collaborations
    assert away.expire_time.ToDatetime() < full  # brought forward to the grace
    # Welcome comes after the hub has committed the agent's return.
    await harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    [back] = (
        await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    ).collaborations
    assert back.state == S.COLLABORATION_STATE_ACTIVE
    assert back.expire_time.ToDatetime() == full


@pytest.mark.parametrize("key", ["collaboration_session_id", "hub_verified"])
async def test_a_share_cannot_pose_as_a_hub_owned_fact(harness: HubHarness, key: str) -> None:
    a, b = await connect_pair(harness)
    session_id = await propose(a, "AI_Node_2")
    await accept(b, session_id)
    forged = os_component()
    forged.attributes[key] = session_id
    error = await a.error(await a.send(share_os_component=pb.ShareOsComponent(os_component=forged)))
    assert error.code == 3  # INVALID_ARGUMENT
    field = f"share_os_component.os_component.attributes[{key!r}]"
    assert [(v.field, "reserved for the hub" in v.description) for v in error.field_violations] == [
        (field, True)
    ]
    # The same key in a completion is refused too: only the hub writes it.
    done = collaborative_component()
    done.attributes[key] = "collab_other"
    error = await b.error(
        await b.send(
            complete_collaboration=pb.CompleteCollaboration(session_id=session_id, component=done)
        )
    )
    assert [v.field for v in error.field_violations] == [
        f"complete_collaboration.component.attributes[{key!r}]"
    ]
    await still_works(a)
    listed = await harness.query(
        "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_OS_COMPONENT)
    )
    assert list(listed.artifacts) == []

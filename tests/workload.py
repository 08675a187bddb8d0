"""A small, complete run of three raw trainers against a real hub, recording every answer
each got: shares of every kind, a duplicate, a refused message, a feature request and its
delivery, collaborations completed and declined. The metrics and report tests check the
hub's counts against what is recorded here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb

from .conftest import HubHarness, RawTrainer, code_component, hello, os_component, pattern

REQUIREMENTS = pb.FeatureRequirements(
    performance=pb.PERFORMANCE_LEVEL_HIGH,
    compatibility=pb.SPECIALIZATION_NETWORKING,
    priority=pb.PRIORITY_MEDIUM,
)


@dataclass
class Workload:
    trainers: list[RawTrainer]
    committed: Counter[str] = field(default_factory=Counter)  # kind -> receipts (not duplicate)
    duplicates: Counter[str] = field(default_factory=Counter)
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, code name)

    async def expect_receipt(self, trainer: RawTrainer, kind: str, mid: str) -> pb.Receipt:
        receipt = await trainer.receipt(mid)
        (self.duplicates if receipt.duplicate else self.committed)[kind] += 1
        return receipt

    async def send(self, trainer: RawTrainer, **body: Any) -> pb.Receipt:
        (kind,) = body
        return await self.expect_receipt(trainer, kind, await trainer.send(**body))


async def run_workload(harness: HubHarness) -> Workload:
    net = await harness.connect(
        "AI_Node_1",
        hello("AI_Node_1", pb.SPECIALIZATION_NETWORKING, capabilities=["network_protocols"]),
    )
    sec = await harness.connect(
        "AI_Node_2",
        hello("AI_Node_2", pb.SPECIALIZATION_SECURITY, capabilities=["security_analysis"]),
    )
    mem = await harness.connect(
        "AI_Node_3",
        hello("AI_Node_3", pb.SPECIALIZATION_PROCESS_MANAGER, capabilities=["memory_management"]),
    )
    work = Workload([net, sec, mem])
    for i in range(3):
        await work.send(net, share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
    await work.send(sec, share_pattern=pb.SharePattern(pattern=pattern("s1")))
    await work.send(
        sec, share_code_component=pb.ShareCodeComponent(code_component=code_component("c1"))
    )
    await work.send(
        mem, share_os_component=pb.ShareOsComponent(os_component=os_component("scheduler"))
    )
    # A resend: the same message_id and body, answered with the original receipt.
    body = pb.SharePattern(pattern=pattern("again"))
    first = await net.send(share_pattern=body)
    await work.expect_receipt(net, "share_pattern", first)
    del net.receipts[first]
    again = await net.send(message_id=first, share_pattern=body)
    assert (await work.expect_receipt(net, "share_pattern", again)).duplicate
    # A refused share: a confidence out of range.
    bad = await net.send(share_pattern=pb.SharePattern(pattern=pattern("bad", confidence=3)))
    error = await net.error(bad)
    work.refused[("share_pattern", pb_code_name(error.code))] += 1

    request = await work.send(
        net,
        request_feature=pb.RequestFeature(
            feature="memory_allocator", requirements=REQUIREMENTS, description="fast please"
        ),
    )
    await work.send(
        mem,
        deliver_feature=pb.DeliverFeature(
            request_id=request.resource_id, component=os_component("memory_allocator")
        ),
    )
    # One collaboration completed, one declined.
    done = await work.send(
        net,
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_2",
            type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
            description="secure transport",
        ),
    )
    await work.send(sec, accept_collaboration=pb.AcceptCollaboration(session_id=done.resource_id))
    await work.send(
        sec,
        report_collaboration_progress=pb.ReportCollaborationProgress(
            session_id=done.resource_id, progress=0.5, note="half"
        ),
    )
    component = os_component("secure_channel")
    component.component_type = "collaborative_component"
    await work.send(
        sec,
        complete_collaboration=pb.CompleteCollaboration(
            session_id=done.resource_id, component=component
        ),
    )
    declined = await work.send(
        mem,
        propose_collaboration=pb.ProposeCollaboration(
            target_agent_id="AI_Node_1",
            type=pb.COLLABORATION_TYPE_CODE_REVIEW,
            description="review my scheduler",
        ),
    )
    await work.send(
        net,
        decline_collaboration=pb.DeclineCollaboration(
            session_id=declined.resource_id, reason="busy"
        ),
    )
    # A last broadcast: once the others have it, they have everything before it; its sender
    # is not sent its own, and has the decline (its own, sent to both partners) just before.
    last = await work.send(net, share_pattern=pb.SharePattern(pattern=pattern("last")))
    await net.until_seq(last.seq - 1)
    await sec.until_seq(last.seq)
    await mem.until_seq(last.seq)
    return work


def pb_code_name(code: int) -> str:
    """google.rpc.Code number -> the gRPC status code's name (INVALID_ARGUMENT...)."""
    name: str = next(c.name for c in grpc.StatusCode if c.value[0] == code)
    return name

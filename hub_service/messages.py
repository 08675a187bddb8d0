"""Message -> command: the state change each validated trainer message asks for.

Transport-agnostic (Flower's message handler): it knows the contract's message kinds and
the commands, not the stream they came on."""

from __future__ import annotations

import hashlib

from generated.kernelhub.v1 import hub_pb2 as pb

from . import commands as cmd
from .collaboration import Step
from .errors import failed_precondition
from .state import Command

# share message kind -> (artifact kind, the field holding the content in both messages)
SHARES = {
    "share_pattern": (pb.ARTIFACT_KIND_PATTERN, "pattern"),
    "share_code_component": (pb.ARTIFACT_KIND_CODE_COMPONENT, "code_component"),
    "share_os_component": (pb.ARTIFACT_KIND_OS_COMPONENT, "os_component"),
}


def to_command(agent_id: str, request: pb.ConnectRequest, kind: str) -> Command:
    """The state change a validated message asks for, with its body's fingerprint (the kind
    and the body, not the message_id), which travels with it to the writer."""
    command = _command(agent_id, request, kind)
    body = getattr(request, kind).SerializeToString(deterministic=True)
    command.fingerprint = hashlib.blake2b(kind.encode() + b"\0" + body, digest_size=16).digest()
    return command


def _command(agent_id: str, request: pb.ConnectRequest, kind: str) -> Command:
    mid = request.message_id
    if kind in SHARES:
        artifact_kind, content = SHARES[kind]
        artifact = pb.Artifact(kind=artifact_kind)
        getattr(artifact, content).CopyFrom(getattr(getattr(request, kind), content))
        return cmd.ShareArtifact(agent_id, mid, artifact)
    if kind == "request_feature":
        return cmd.RequestFeature(agent_id, mid, request.request_feature)
    if kind == "deliver_feature":
        return cmd.DeliverFeature(agent_id, mid, request.deliver_feature)
    if kind == "propose_collaboration":
        return cmd.ProposeCollaboration(agent_id, mid, request.propose_collaboration)
    if kind == "accept_collaboration":
        return cmd.CollaborationStep(
            agent_id, mid, request.accept_collaboration.session_id, Step.ACCEPT
        )
    if kind == "decline_collaboration":
        body = request.decline_collaboration
        return cmd.CollaborationStep(agent_id, mid, body.session_id, Step.DECLINE, note=body.reason)
    if kind == "report_collaboration_progress":
        report = request.report_collaboration_progress
        return cmd.CollaborationStep(
            agent_id,
            mid,
            report.session_id,
            Step.PROGRESS,
            progress=report.progress,
            note=report.note,
        )
    if kind == "complete_collaboration":
        done = request.complete_collaboration
        return cmd.CollaborationStep(
            agent_id, mid, done.session_id, Step.COMPLETE, component=done.component
        )
    raise failed_precondition(f"unsupported message kind {kind}")  # validate() knows every kind

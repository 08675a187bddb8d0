"""Bad input is refused with the exact field named, stores nothing, reaches nobody, and the stream goes on."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import paging
from hub_service.errors import StatusError
from hub_service.validation import Limits, validate

from .conftest import KINDS, WAIT, HubHarness, auth, code_component, hello, os_component, pattern

INVALID_ARGUMENT, FAILED_PRECONDITION = 3, 9
KIB64 = 64 * 1024
NAN, INF = math.nan, math.inf


def requirements() -> pb.FeatureRequirements:
    return pb.FeatureRequirements(
        performance=pb.PERFORMANCE_LEVEL_MEDIUM,
        compatibility=pb.SPECIALIZATION_PROCESS_MANAGER,
        priority=pb.PRIORITY_HIGH,
    )


def good(kind: str) -> Message:
    """A fresh, valid body of each kind."""
    bodies: dict[str, Callable[[], Message]] = {
        "share_pattern": lambda: pb.SharePattern(pattern=pattern()),
        "share_code_component": lambda: pb.ShareCodeComponent(code_component=code_component()),
        "share_os_component": lambda: pb.ShareOsComponent(os_component=os_component()),
        "request_feature": lambda: pb.RequestFeature(
            feature="memory_allocator", requirements=requirements(), description="fast"
        ),
        "deliver_feature": lambda: pb.DeliverFeature(
            request_id="feat_1", component=os_component("memory_allocator")
        ),
        "propose_collaboration": lambda: pb.ProposeCollaboration(
            target_agent_id="AI_Node_2",
            type=pb.COLLABORATION_TYPE_JOINT_OPTIMIZATION,
            description="tune it",
        ),
        "accept_collaboration": lambda: pb.AcceptCollaboration(session_id="collab_1"),
        "decline_collaboration": lambda: pb.DeclineCollaboration(
            session_id="collab_1", reason="no"
        ),
        "report_collaboration_progress": lambda: pb.ReportCollaborationProgress(
            session_id="collab_1", progress=0.5, note="half"
        ),
        "complete_collaboration": lambda: pb.CompleteCollaboration(
            session_id="collab_1", component=os_component("joint")
        ),
        "subscribe": lambda: pb.Subscribe(
            subscription=pb.Subscription(
                event_kinds=[pb.EVENT_KIND_ARTIFACTS],
                specializations=[pb.SPECIALIZATION_NETWORKING],
                contributors=["AI_Node_3"],
            )
        ),
    }
    return bodies[kind]()


def setter(path: str, value: Any) -> Callable[[Any], object]:
    """A mutation that sets the dotted `path` under the body to `value`."""

    def mutate(body: Any) -> None:
        *parents, name = path.split(".")
        for part in parents:
            body = getattr(body, part)
        setattr(body, name, value)

    return mutate


def extend(path: str, values: Iterable[Any]) -> Callable[[Any], object]:
    def mutate(body: Any) -> None:
        *parents, name = path.split(".")
        for part in parents:
            body = getattr(body, part)
        getattr(body, name).extend(values)

    return mutate


def put(path: str, entries: dict[str, str]) -> Callable[[Any], object]:
    def mutate(body: Any) -> None:
        for part in path.split("."):
            body = getattr(body, part)
        body.update(entries)

    return mutate


def clear(field: str) -> Callable[[Any], object]:
    return lambda body: body.ClearField(field)


# (kind, mutation of a good body, the one field path the hub must name)
Case = tuple[str, Callable[[Any], object], str]

SP, SCC, SOC = "share_pattern", "share_code_component", "share_os_component"
RF, DF, PC = "request_feature", "deliver_feature", "propose_collaboration"
AC, DC = "accept_collaboration", "decline_collaboration"
RCP, CC = "report_collaboration_progress", "complete_collaboration"


def at(kind: str, path: str, value: Any) -> Case:
    """Set `path` (under the body) to `value`; the hub must name `kind.path`."""
    return (kind, setter(path, value), f"{kind}.{path}")


def missing(kind: str, field: str) -> Case:
    return (kind, clear(field), f"{kind}.{field}")


def extended(kind: str, path: str, values: Iterable[Any], named: str) -> Case:
    return (kind, extend(path, values), f"{kind}.{named}")


def attributes(kind: str, path: str, entries: dict[str, str], named: str) -> Case:
    return (kind, put(path, entries), f"{kind}.{named}")


OS_METRICS = "os_component.performance_metrics"
SUB = "subscribe"
CASES: dict[str, Case] = {
    # share_pattern
    "pattern-missing": missing(SP, "pattern"),
    "pattern-id-empty": at(SP, "pattern.pattern_id", ""),
    "pattern-id-too-long": at(SP, "pattern.pattern_id", "p" * 129),
    "pattern-id-bad-chars": at(SP, "pattern.pattern_id", "has space"),
    "pattern-id-leading-dash": at(SP, "pattern.pattern_id", "-p"),
    "pattern-type-empty": at(SP, "pattern.pattern_type", ""),
    "pattern-type-not-snake": at(SP, "pattern.pattern_type", "NetworkingPattern"),
    "pattern-type-too-long": at(SP, "pattern.pattern_type", "p" * 65),
    "pattern-spec-unspecified": at(SP, "pattern.specialization", 0),
    "pattern-spec-unknown": at(SP, "pattern.specialization", 99),
    "pattern-complexity-above-1": at(SP, "pattern.complexity", 1.5),
    "pattern-reusability-negative": at(SP, "pattern.reusability", -0.1),
    "pattern-impact-nan": at(SP, "pattern.performance_impact", NAN),
    "pattern-confidence-inf": at(SP, "pattern.confidence", INF),
    "pattern-too-many-attributes": attributes(
        SP, "pattern.attributes", {f"k{i}": "v" for i in range(33)}, "pattern.attributes"
    ),
    "pattern-attribute-key-not-snake": attributes(
        SP, "pattern.attributes", {"Bad Key": "v"}, "pattern.attributes['Bad Key']"
    ),
    "pattern-attribute-hub-owned": attributes(
        SP,
        "pattern.attributes",
        {"collaboration_session_id": "collab_1"},
        "pattern.attributes['collaboration_session_id']",
    ),
    "pattern-attribute-hub-prefix": attributes(
        SP, "pattern.attributes", {"hub_verified": "yes"}, "pattern.attributes['hub_verified']"
    ),
    "pattern-attribute-value-too-long": attributes(
        SP, "pattern.attributes", {"note": "v" * 1025}, "pattern.attributes['note']"
    ),
    # share_code_component
    "code-missing": missing(SCC, "code_component"),
    "code-id-empty": at(SCC, "code_component.component_id", ""),
    "code-name-blank": at(SCC, "code_component.name", "   "),
    "code-name-too-long": at(SCC, "code_component.name", "n" * 201),
    "code-language-not-snake": at(SCC, "code_component.language", "C++"),
    "code-code-empty": at(SCC, "code_component.code", ""),
    "code-code-blank": at(SCC, "code_component.code", " \n\t"),
    "code-code-over-64k": at(SCC, "code_component.code", "x" * (KIB64 + 1)),
    "code-code-over-64k-bytes-not-chars": at(SCC, "code_component.code", "é" * (KIB64 // 2 + 1)),
    "code-too-many-dependencies": extended(
        SCC,
        "code_component.dependencies",
        [f"d{i}" for i in range(64)],
        "code_component.dependencies",
    ),
    "code-dependency-empty": extended(
        SCC, "code_component.dependencies", [""], "code_component.dependencies[1]"
    ),
    "code-dependency-too-long": extended(
        SCC, "code_component.dependencies", ["d" * 201], "code_component.dependencies[1]"
    ),
    "code-coverage-above-1": at(SCC, "code_component.test_coverage", 1.01),
    "code-score-nan": at(SCC, "code_component.performance_score", NAN),
    "code-spec-unspecified": at(SCC, "code_component.specialization", 0),
    # share_os_component
    "os-missing": missing(SOC, "os_component"),
    "os-id-bad-chars": at(SOC, "os_component.component_id", "a/b"),
    "os-name-empty": at(SOC, "os_component.name", ""),
    "os-type-not-snake": at(SOC, "os_component.component_type", "OS Feature"),
    "os-no-specializations": (
        SOC,
        lambda b: b.os_component.ClearField("specializations"),
        f"{SOC}.os_component.specializations",
    ),
    "os-specialization-unspecified": extended(
        SOC, "os_component.specializations", [0], "os_component.specializations[1]"
    ),
    "os-specialization-unknown": extended(
        SOC, "os_component.specializations", [42], "os_component.specializations[1]"
    ),
    "os-too-many-specializations": extended(
        SOC, "os_component.specializations", [1] * 9, "os_component.specializations"
    ),
    "os-language-empty": at(SOC, "os_component.language", ""),
    "os-implementation-over-64k": at(SOC, "os_component.implementation", "y" * (KIB64 + 1)),
    "os-too-many-test-cases": extended(
        SOC, "os_component.test_cases", [f"t{i}" for i in range(64)], "os_component.test_cases"
    ),
    "os-cpu-above-1": at(SOC, f"{OS_METRICS}.cpu_usage", 2.0),
    "os-memory-negative": at(SOC, f"{OS_METRICS}.memory_kib", -1.0),
    "os-memory-nan": at(SOC, f"{OS_METRICS}.memory_kib", NAN),
    "os-time-inf": at(SOC, f"{OS_METRICS}.execution_time_seconds", INF),
    "os-quality-minus-inf": at(SOC, "os_component.quality_score", -INF),
    "os-attribute-key-empty": attributes(
        SOC, "os_component.attributes", {"": "v"}, "os_component.attributes['']"
    ),
    # request_feature
    "feature-empty": at(RF, "feature", ""),
    "feature-not-snake": at(RF, "feature", "Memory Allocator"),
    "feature-requirements-missing": missing(RF, "requirements"),
    "feature-performance-unspecified": at(RF, "requirements.performance", 0),
    "feature-performance-unknown": at(RF, "requirements.performance", 4),
    "feature-priority-unspecified": at(RF, "requirements.priority", 0),
    "feature-priority-unknown": at(RF, "requirements.priority", 7),
    "feature-compatibility-unknown": at(RF, "requirements.compatibility", 99),
    "feature-description-too-long": at(RF, "description", "d" * 4097),
    # deliver_feature
    "deliver-request-id-empty": at(DF, "request_id", ""),
    "deliver-request-id-bad-chars": at(DF, "request_id", "feat 1"),
    "deliver-component-missing": missing(DF, "component"),
    "deliver-component-quality": at(DF, "component.quality_score", 3.0),
    "deliver-component-no-code": at(DF, "component.implementation", ""),
    # propose_collaboration
    "propose-target-empty": at(PC, "target_agent_id", ""),
    "propose-target-bad-chars": at(PC, "target_agent_id", "AI Node"),
    "propose-type-unspecified": at(PC, "type", 0),
    "propose-type-unknown": at(PC, "type", 17),
    "propose-description-too-long": at(PC, "description", "d" * 4097),
    # accept / decline
    "accept-session-empty": at(AC, "session_id", ""),
    "accept-session-too-long": at(AC, "session_id", "s" * 129),
    "decline-session-empty": at(DC, "session_id", ""),
    "decline-reason-too-long": at(DC, "reason", "r" * 4097),
    # report_collaboration_progress
    "progress-session-empty": at(RCP, "session_id", ""),
    "progress-above-1": at(RCP, "progress", 1.5),
    "progress-negative": at(RCP, "progress", -0.5),
    "progress-nan": at(RCP, "progress", NAN),
    "progress-inf": at(RCP, "progress", INF),
    "progress-note-too-long": at(RCP, "note", "n" * 4097),
    # complete_collaboration
    "complete-session-bad-chars": at(CC, "session_id", "collab#1"),
    "complete-component-missing": missing(CC, "component"),
    "complete-component-over-64k": at(CC, "component.implementation", "z" * (KIB64 + 1)),
    "complete-component-spec-unknown": extended(
        CC, "component.specializations", [9], "component.specializations[1]"
    ),
    # subscribe: unknown or unset enums, too many terms, bad agent ids
    "subscribe-event-kind-unknown": extended(
        SUB, "subscription.event_kinds", [9], "subscription.event_kinds[1]"
    ),
    "subscribe-event-kind-unspecified": extended(
        SUB, "subscription.event_kinds", [0], "subscription.event_kinds[1]"
    ),
    "subscribe-too-many-event-kinds": extended(
        SUB, "subscription.event_kinds", [1, 2, 3, 4], "subscription.event_kinds"
    ),
    "subscribe-artifact-kind-unknown": extended(
        SUB, "subscription.artifact_kinds", [7], "subscription.artifact_kinds[0]"
    ),
    "subscribe-specialization-unknown": extended(
        SUB, "subscription.specializations", [42], "subscription.specializations[1]"
    ),
    "subscribe-too-many-specializations": extended(
        SUB, "subscription.specializations", range(1, 9), "subscription.specializations"
    ),
    "subscribe-contributor-bad-chars": extended(
        SUB, "subscription.contributors", ["has space"], "subscription.contributors[1]"
    ),
    "subscribe-too-many-contributors": extended(
        SUB, "subscription.contributors", [f"a{i}" for i in range(64)], "subscription.contributors"
    ),
}


def request_with(kind: str, body: Message, message_id: str = "m-1") -> pb.ConnectRequest:
    request = pb.ConnectRequest(message_id=message_id)
    getattr(request, kind).CopyFrom(body)
    return request


def bad_request(name: str, message_id: str = "m-1") -> pb.ConnectRequest:
    kind, mutate, _ = CASES[name]
    body = good(kind)
    mutate(body)
    return request_with(kind, body, message_id)


# Envelope cases: (request, field)
ENVELOPE: dict[str, tuple[pb.ConnectRequest, str]] = {
    "message-id-empty": (
        pb.ConnectRequest(message_id="", share_pattern=pb.SharePattern(pattern=pattern())),
        "message_id",
    ),
    "message-id-too-long": (
        pb.ConnectRequest(message_id="m" * 129, share_pattern=pb.SharePattern(pattern=pattern())),
        "message_id",
    ),
    "message-id-bad-chars": (
        pb.ConnectRequest(
            message_id="id with spaces", share_pattern=pb.SharePattern(pattern=pattern())
        ),
        "message_id",
    ),
    "body-unset": (pb.ConnectRequest(message_id="no-body"), "body"),
}


# --- pure unit tests of validate() -------------------------------------------------


def violations_of(request: pb.ConnectRequest, limits: Limits | None = None) -> StatusError:
    with pytest.raises(StatusError) as raised:
        validate(request, limits or Limits())
    return raised.value


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_names_exactly_the_bad_field(name: str) -> None:
    error = violations_of(bad_request(name))
    field = CASES[name][2]
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]
    assert all(why for _, why in error.violations)
    assert field in error.message


@pytest.mark.parametrize("name", sorted(ENVELOPE))
def test_validate_envelope(name: str) -> None:
    request, field = ENVELOPE[name]
    error = violations_of(request)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error.violations] == [field]


def test_validate_reports_every_bad_field_in_order() -> None:
    request = pb.ConnectRequest(
        message_id="",
        share_pattern=pb.SharePattern(
            pattern=pb.Pattern(
                pattern_id="p",
                pattern_type="t",
                specialization=pb.Specialization.ValueType(9),
                complexity=2,
                confidence=NAN,
            )
        ),
    )
    error = violations_of(request)
    assert [f for f, _ in error.violations] == [
        "message_id",
        "share_pattern.pattern.specialization",
        "share_pattern.pattern.complexity",
        "share_pattern.pattern.confidence",
    ]
    assert "got 2" in dict(error.violations)["share_pattern.pattern.complexity"]
    assert "9 is not a known Specialization" in error.message
    both = violations_of(pb.ConnectRequest(message_id="bad id"))
    assert [f for f, _ in both.violations] == ["message_id", "body"]


def test_a_second_hello_is_failed_precondition() -> None:
    error = violations_of(pb.ConnectRequest(message_id="h2", hello=hello("AI_Node_1")))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert error.violations == []
    assert "hello" in error.message


@pytest.mark.parametrize("kind", KINDS)
def test_good_bodies_pass_and_name_their_kind(kind: str) -> None:
    assert validate(request_with(kind, good(kind)), Limits()) == kind


BOUNDARIES: dict[str, tuple[str, Callable[[Any], object]]] = {
    "code-exactly-64k": ("share_code_component", setter("code_component.code", "x" * KIB64)),
    "code-64k-of-two-byte-chars": (
        "share_code_component",
        setter("code_component.code", "é" * (KIB64 // 2)),
    ),
    "64-dependencies": (
        "share_code_component",
        extend("code_component.dependencies", [f"d{i}" for i in range(63)]),
    ),
    "32-attributes": (
        "share_pattern",
        put("pattern.attributes", {f"k{i}": "v" * 1024 for i in range(32)}),
    ),
    "id-of-128": ("share_pattern", setter("pattern.pattern_id", "p" * 128)),
    "id-punctuation": ("share_pattern", setter("pattern.pattern_id", "a1_.:-z")),
    "fraction-0": ("share_pattern", setter("pattern.complexity", 0.0)),
    "fraction-1": ("share_pattern", setter("pattern.confidence", 1.0)),
    "snake-of-64": ("share_pattern", setter("pattern.pattern_type", "p" * 64)),
    "text-of-4096": ("request_feature", setter("description", "d" * 4096)),
    "compatibility-may-be-unspecified": (
        "request_feature",
        setter("requirements.compatibility", 0),
    ),
    "eight-specializations": (
        "share_os_component",
        extend("os_component.specializations", range(2, 9)),
    ),
    "progress-0": ("report_collaboration_progress", setter("progress", 0.0)),
    "progress-1": ("report_collaboration_progress", setter("progress", 1.0)),
    "memory-large": (
        "share_os_component",
        setter("os_component.performance_metrics.memory_kib", 1e12),
    ),
    "empty-description-and-reason": ("decline_collaboration", setter("reason", "")),
}


@pytest.mark.parametrize("name", sorted(BOUNDARIES))
def test_values_at_the_limits_are_accepted(name: str) -> None:
    kind, mutate = BOUNDARIES[name]
    body = good(kind)
    mutate(body)
    assert validate(request_with(kind, body, "m" * 128), Limits()) == kind


def test_limits_are_configurable() -> None:
    body = pb.ShareCodeComponent(code_component=code_component())
    body.code_component.code = "x" * 11
    error = violations_of(
        pb.ConnectRequest(message_id="m", share_code_component=body), Limits(max_code_bytes=10)
    )
    assert error.violations == [
        ("share_code_component.code_component.code", "must be at most 10 bytes, got 11")
    ]
    body.code_component.code = "x" * 10
    assert validate(
        pb.ConnectRequest(message_id="m", share_code_component=body), Limits(max_code_bytes=10)
    )


# --- the same refusals over a real stream ----------------------------------------------


def cases_of(kind: str) -> list[str]:
    return sorted(name for name, case in CASES.items() if case[0] == kind)


async def assert_nothing_leaked(
    harness: HubHarness, observer_events: list[pb.HubEvent], good_seq: int
) -> None:
    """The observer saw no event before the good message; nothing else was stored."""
    before = [e for e in observer_events if e.seq < good_seq]
    assert before == []
    artifacts = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert len(artifacts.artifacts) == 1
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert list(requests.feature_requests) == []
    collaborations = await harness.query("ListCollaborations", pb.ListCollaborationsRequest())
    assert list(collaborations.collaborations) == []
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert stats.head_seq == good_seq  # the refused messages did not even take a seq


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_messages_of_each_kind_are_refused_on_the_stream(
    harness: HubHarness, kind: str
) -> None:
    sender = await harness.connect("AI_Node_1")
    observer = await harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    names = cases_of(kind)
    assert names
    for i, name in enumerate(names):
        await sender.call.write(bad_request(name, message_id=f"bad-{i}"))
    for i, name in enumerate(names):
        error = await sender.error(f"bad-{i}")
        field = CASES[name][2]
        assert (error.code, error.code_name) == (INVALID_ARGUMENT, "INVALID_ARGUMENT"), name
        assert field in error.message, name
        assert [v.field for v in error.field_violations] == [field], name
        assert all(v.description for v in error.field_violations)
    assert sender.receipts == {}

    good_receipt = await sender.receipt(
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern()))
    )
    await observer.event("artifact_shared", artifact_id=good_receipt.resource_id)
    await assert_nothing_leaked(harness, observer.events, good_receipt.seq)


async def test_bad_envelopes_and_a_second_hello_are_refused_on_the_stream(
    harness: HubHarness,
) -> None:
    sender = await harness.connect("AI_Node_1")
    observer = await harness.connect("AI_Node_2", hello("AI_Node_2", pb.SPECIALIZATION_SECURITY))
    for name in sorted(ENVELOPE):
        request, field = ENVELOPE[name]
        await sender.call.write(request)
        error = await sender.error(request.message_id)
        assert (error.code, error.code_name) == (INVALID_ARGUMENT, "INVALID_ARGUMENT"), name
        assert field in error.message, name
        assert [v.field for v in error.field_violations] == [field], name

    again = await sender.send("hello-again", hello=hello("AI_Node_1"))
    error = await sender.error(again)
    assert (error.code, error.code_name) == (FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert "hello" in error.message and list(error.field_violations) == []

    good_receipt = await sender.receipt(
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern()))
    )
    await observer.event("artifact_shared", artifact_id=good_receipt.resource_id)
    await assert_nothing_leaked(harness, observer.events, good_receipt.seq)
    # The second hello changed nothing about the agent.
    agents = await harness.query("ListAgents", pb.ListAgentsRequest())
    assert [(a.agent_id, a.online) for a in agents.agents] == [
        ("AI_Node_1", True),
        ("AI_Node_2", True),
    ]


async def test_a_bad_message_id_reused_later_is_not_a_duplicate(harness: HubHarness) -> None:
    sender = await harness.connect("AI_Node_1")
    await sender.send("reused", share_pattern=pb.SharePattern(pattern=pattern("")))
    assert (await sender.error("reused")).code == INVALID_ARGUMENT
    del sender.errors["reused"]  # answers are keyed by message_id: wait for the next one
    receipt = await sender.receipt(
        await sender.send("reused", share_pattern=pb.SharePattern(pattern=pattern()))
    )
    assert not receipt.duplicate and receipt.resource_id.startswith("art_")


# --- unary queries ----------------------------------------------------------------------


async def rich_error(harness: HubHarness, method: str, request: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.query(method, request)
    return raised.value


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == code_pb2.INVALID_ARGUMENT
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
        assert all(v.description for v in bad.field_violations)
    return fields


QUERY_ERRORS: dict[str, tuple[str, Any, str]] = {
    "agents-bad-token": (
        "ListAgents",
        pb.ListAgentsRequest(page_token="not a token!"),
        "page_token",
    ),
    "agents-non-numeric-token": (
        "ListAgents",
        pb.ListAgentsRequest(page_token=paging.encode("abc")),
        "page_token",
    ),
    "agents-negative-size": ("ListAgents", pb.ListAgentsRequest(page_size=-1), "page_size"),
    "artifacts-bad-token": (
        "ListArtifacts",
        pb.ListArtifactsRequest(page_token="zzzz"),
        "page_token",
    ),
    "artifacts-negative-size": (
        "ListArtifacts",
        pb.ListArtifactsRequest(page_size=-5),
        "page_size",
    ),
    "artifacts-unknown-kind": (
        "ListArtifacts",
        pb.ListArtifactsRequest(kind=pb.ArtifactKind.ValueType(9)),
        "kind",
    ),
    "artifacts-unknown-specialization": (
        "ListArtifacts",
        pb.ListArtifactsRequest(specialization=pb.Specialization.ValueType(99)),
        "specialization",
    ),
    "collaborations-bad-token": (
        "ListCollaborations",
        pb.ListCollaborationsRequest(page_token="zzzz"),
        "page_token",
    ),
    "collaborations-negative-size": (
        "ListCollaborations",
        pb.ListCollaborationsRequest(page_size=-1),
        "page_size",
    ),
    "collaborations-unknown-state": (
        "ListCollaborations",
        pb.ListCollaborationsRequest(state=pb.CollaborationState.ValueType(42)),
        "state",
    ),
    "features-bad-token": (
        "ListFeatureRequests",
        pb.ListFeatureRequestsRequest(page_token="!!"),
        "page_token",
    ),
    "features-negative-size": (
        "ListFeatureRequests",
        pb.ListFeatureRequestsRequest(page_size=-2),
        "page_size",
    ),
    "get-artifact-empty-id": ("GetArtifact", pb.GetArtifactRequest(), "artifact_id"),
}


@pytest.mark.parametrize("name", sorted(QUERY_ERRORS))
async def test_bad_queries_are_invalid_argument_with_bad_request_details(
    harness: HubHarness, name: str
) -> None:
    method, request, field = QUERY_ERRORS[name]
    error = await rich_error(harness, method, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.details() or "")
    assert bad_request_fields(error) == [field]


async def test_page_token_with_an_out_of_range_number_is_invalid_argument(
    harness: HubHarness,
) -> None:
    error = await rich_error(
        harness, "ListArtifacts", pb.ListArtifactsRequest(page_token=paging.encode("9" * 30))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_unknown_artifact_is_not_found(harness: HubHarness) -> None:
    error = await rich_error(
        harness, "GetArtifact", pb.GetArtifactRequest(artifact_id="art_missing")
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "art_missing" in (error.details() or "")


# --- trailing newlines -------------------------------------------------------------------

NEWLINE_CASES: dict[str, tuple[pb.ConnectRequest, str]] = {
    "message-id": (
        pb.ConnectRequest(message_id="m1\n", share_pattern=pb.SharePattern(pattern=pattern())),
        "message_id",
    ),
    "pattern-id": (
        pb.ConnectRequest(message_id="m1", share_pattern=pb.SharePattern(pattern=pattern("p1\n"))),
        "share_pattern.pattern.pattern_id",
    ),
    "feature": (
        pb.ConnectRequest(
            message_id="m1",
            request_feature=pb.RequestFeature(
                feature="memory_allocator\n", requirements=requirements()
            ),
        ),
        "request_feature.feature",
    ),
    "session-id": (
        pb.ConnectRequest(
            message_id="m1", accept_collaboration=pb.AcceptCollaboration(session_id="collab_1\n")
        ),
        "accept_collaboration.session_id",
    ),
}


@pytest.mark.parametrize("name", sorted(NEWLINE_CASES))
def test_a_trailing_newline_is_not_an_identifier(name: str) -> None:
    request, field = NEWLINE_CASES[name]
    assert [f for f, _ in violations_of(request).violations] == [field]


async def test_a_capability_with_a_trailing_newline_is_refused(harness: HubHarness) -> None:
    caps = ["network_protocols\n", "communication"]
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
    await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_1", capabilities=caps)))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), WAIT)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello.capabilities[0]" in (raised.value.details() or "")
    finally:
        call.cancel()
    agents = await harness.query("ListAgents", pb.ListAgentsRequest())
    assert list(agents.agents) == []


@pytest.mark.parametrize(
    ("requested", "used"), [(0, 50), (1, 1), (500, 500), (501, 500), (2**31 - 1, 500)]
)
def test_page_size_defaults_and_is_capped(requested: int, used: int) -> None:
    assert paging.page_size(requested) == used


def test_page_tokens_round_trip() -> None:
    assert paging.decode_int(paging.encode("12345")) == 12345
    assert paging.decode_int("") is None
    assert paging.decode(paging.encode("collab_0123abc")) == "collab_0123abc"

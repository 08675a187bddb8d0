"""The proto's comments are what other languages read: they must name the routing vocabulary
the hub really uses, so a client written from the contract alone need not guess it."""

from __future__ import annotations

import re
from pathlib import Path

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.features import FEATURE_CAPABILITIES, feature_name
from trainer_service.simulation.capabilities import (
    BASE_CAPABILITIES,
    SPECIALIZATION_CAPABILITIES,
)

PROTO = Path(__file__).resolve().parent.parent / "protos" / "kernelhub" / "v1" / "hub.proto"
ROUTING_CAPABILITIES = sorted(set().union(*FEATURE_CAPABILITIES.values()))


def field_comment(message: str, field: str) -> str:
    """The `//` lines directly above `field`'s declaration in `message`, joined."""
    text = PROTO.read_text()
    body = re.search(rf"^message {message} \{{\n(.*?)^\}}", text, re.M | re.S)
    assert body is not None, f"message {message} not found in {PROTO}"
    lines = body.group(1).splitlines()
    declaration = re.compile(rf"^\s*[\w.<>, ]+ {field} = \d+;")
    index = next((i for i, line in enumerate(lines) if declaration.match(line)), None)
    assert index is not None, f"{message}.{field} not found"
    comment: list[str] = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(comment)


def words(comment: str) -> set[str]:
    return set(re.findall(r"[a-z][a-z0-9_]*", comment))


def enum_value_comments(enum: str) -> dict[str, str]:
    """Each value of `enum` -> the `//` lines directly above it, joined."""
    body = re.search(rf"^enum {enum} \{{\n(.*?)^\}}", PROTO.read_text(), re.M | re.S)
    assert body is not None, f"enum {enum} not found in {PROTO}"
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in body.group(1).splitlines():
        if line.strip().startswith("//"):
            pending.append(line.strip().removeprefix("//").strip())
        elif value := re.match(r"^\s*(\w+) = \d+;", line):
            comments[value.group(1)] = " ".join(pending)
            pending = []
    return comments


def test_the_feature_enum_is_the_routing_vocabulary_with_exactly_its_capabilities() -> None:
    documented = {
        feature_name(pb.Feature.Value(value)): words(comment.removeprefix("Capabilities:"))
        for value, comment in enum_value_comments("Feature").items()
        if value != "FEATURE_UNSPECIFIED"
    }
    assert documented == {f: set(c) for f, c in FEATURE_CAPABILITIES.items()}


def test_capabilities_comment_names_every_routing_and_announced_capability() -> None:
    named = words(field_comment("Hello", "capabilities"))
    announced = {
        *BASE_CAPABILITIES,
        *(c for cs in SPECIALIZATION_CAPABILITIES.values() for c in cs),
    }
    missing = sorted(
        (set(ROUTING_CAPABILITIES) | announced | set(SPECIALIZATION_CAPABILITIES)) - named
    )
    assert not missing, f"Hello.capabilities does not name {missing}"


def test_routed_to_comment_points_at_the_routing_rule() -> None:
    comment = field_comment("FeatureRequestInfo", "routed_to")
    assert "RequestFeature.feature" in comment
    assert "Hello.capabilities" in comment


# Every message a client fills in (ConnectRequest itself is only an envelope: its body is a
# oneof of these, and its message_id comment states its own rule).
REQUEST_MESSAGES = (
    "Hello",
    "SharePattern",
    "ShareCodeComponent",
    "ShareOsComponent",
    "RequestFeature",
    "DeliverFeature",
    "ProposeCollaboration",
    "AcceptCollaboration",
    "DeclineCollaboration",
    "ReportCollaborationProgress",
    "CompleteCollaboration",
    "RequestBatch",
    "Pattern",
    "CodeComponent",
    "OsComponent",
    "PerformanceMetrics",
    "FeatureRequirements",
    "ListAgentsRequest",
    "ListArtifactsRequest",
    "GetArtifactRequest",
    "ListCollaborationsRequest",
    "ListFeatureRequestsRequest",
)


def test_every_request_field_says_whether_it_is_required() -> None:
    unmarked = [
        f"{message}.{field.name}"
        for message in REQUEST_MESSAGES
        for field in pb.DESCRIPTOR.message_types_by_name[message].fields
        if not field_comment(message, field.name).startswith(("Required", "Optional"))
    ]
    assert not unmarked, f"these comments say neither Required nor Optional: {unmarked}"


def test_readme_routing_table_matches_the_code() -> None:
    readme = (PROTO.parents[3] / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (`[a-z_]+`(?:, `[a-z_]+`)*) \|$", readme, re.M))
    documented = {
        feature: set(re.findall(r"`([a-z_]+)`", rows[feature]))
        for feature in FEATURE_CAPABILITIES
        if feature in rows
    }
    assert documented == {f: set(c) for f, c in FEATURE_CAPABILITIES.items()}

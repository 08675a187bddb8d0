"""Checks every trainer message before anything is stored, and names each bad field.

Validation is pure and synchronous: it runs on the stream's own task, so a bad
message is answered at once and never reaches the database or other agents.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from generated.kernelhub.v1 import hub_pb2 as pb

from .errors import failed_precondition, invalid
from .subscriptions import MAX_ARTIFACT_KINDS, MAX_EVENT_KINDS, MAX_SPECIALIZATIONS

IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")  # used with fullmatch
SNAKE = re.compile(r"[a-z][a-z0-9_]*")
C_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a self-test's entry point
# States a verdict may have (PENDING and UNSPECIFIED are the hub's, before a verdict).
VERDICT_STATES = frozenset(
    {
        pb.VALIDATION_STATE_PASSED,
        pb.VALIDATION_STATE_FAILED,
        pb.VALIDATION_STATE_ERROR,
        pb.VALIDATION_STATE_UNSUPPORTED,
        pb.VALIDATION_STATE_TIMED_OUT,
    }
)
# Attribute keys only the hub writes, so nothing a client sends can pose as a hub-owned fact:
# any key with this prefix, and the key the hub has always put on a collaboration's result.
HUB_ATTRIBUTE_PREFIX = "hub_"
COLLABORATION_SESSION_ATTRIBUTE = "collaboration_session_id"
HUB_ATTRIBUTES = frozenset({COLLABORATION_SESSION_ATTRIBUTE})


@dataclass(frozen=True)
class Limits:
    """Size limits; each crossing is an INVALID_ARGUMENT that names the field and the limit."""

    max_id_length: int = 128
    max_name_length: int = 200
    max_text_length: int = 4096
    max_code_bytes: int = 64 * 1024
    max_list_items: int = 64
    max_attributes: int = 32
    max_attribute_value_length: int = 1024
    max_batch_requests: int = 64


class _Checker:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.violations: list[tuple[str, str]] = []

    def fail(self, path: str, why: str) -> None:
        self.violations.append((path, why))

    def identifier(self, path: str, value: str, required: bool = True) -> None:
        if not value:
            if required:
                self.fail(path, "is required")
        elif len(value) > self.limits.max_id_length:
            self.fail(
                path, f"must be at most {self.limits.max_id_length} characters, got {len(value)}"
            )
        elif not IDENTIFIER.fullmatch(value):
            self.fail(
                path,
                "may contain only letters, digits and _ . : - (starting with a letter or digit)",
            )

    def snake(self, path: str, value: str, required: bool = True) -> None:
        if not value:
            if required:
                self.fail(path, "is required")
        elif len(value) > 64 or not SNAKE.fullmatch(value):
            self.fail(
                path, f"must be lower_snake_case of at most 64 characters, got {value[:80]!r}"
            )

    def text(self, path: str, value: str, limit: int | None = None, required: bool = False) -> None:
        limit = limit or self.limits.max_text_length
        if required and not value.strip():
            self.fail(path, "is required")
        elif len(value) > limit:
            self.fail(path, f"must be at most {limit} characters, got {len(value)}")
        elif "\x00" in value:
            self.fail(path, "must not contain NUL characters")

    def fraction(self, path: str, value: float) -> None:
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            self.fail(path, f"must be between 0.0 and 1.0, got {value}")

    def non_negative(self, path: str, value: float) -> None:
        if not math.isfinite(value) or value < 0.0:
            self.fail(path, f"must be a finite number >= 0, got {value}")

    def enum(self, path: str, value: int, enum_type: type, required: bool = True) -> None:
        descriptor = enum_type.DESCRIPTOR  # type: ignore[attr-defined]
        if value not in descriptor.values_by_number:
            self.fail(path, f"{value} is not a known {descriptor.name}")
        elif required and value == 0:
            self.fail(path, f"is required (not {descriptor.values_by_number[0].name})")

    def items(self, path: str, values: Iterable[str], snake: bool = False) -> None:
        values = list(values)
        if len(values) > self.limits.max_list_items:
            self.fail(
                path, f"must have at most {self.limits.max_list_items} items, got {len(values)}"
            )
            return
        for i, value in enumerate(values):
            if snake:
                self.snake(f"{path}[{i}]", value)
            else:
                self.text(f"{path}[{i}]", value, self.limits.max_name_length, required=True)

    def attributes(self, path: str, values: Mapping[str, str]) -> None:
        if len(values) > self.limits.max_attributes:
            self.fail(
                path, f"must have at most {self.limits.max_attributes} entries, got {len(values)}"
            )
            return
        for key, value in values.items():
            entry = f"{path}[{key[:40]!r}]"
            if key in HUB_ATTRIBUTES or key.startswith(HUB_ATTRIBUTE_PREFIX):
                self.fail(
                    entry,
                    f"is reserved for the hub (keys starting with {HUB_ATTRIBUTE_PREFIX!r}, "
                    f"and {', '.join(sorted(HUB_ATTRIBUTES))})",
                )
                continue
            self.snake(entry, key)
            self.text(entry, value, self.limits.max_attribute_value_length)

    def subscription(self, path: str, s: pb.Subscription) -> None:
        """Known, non-UNSPECIFIED enums and at most a field's limit of terms."""
        for name, enum_type, limit in (
            ("event_kinds", pb.EventKind, MAX_EVENT_KINDS),
            ("artifact_kinds", pb.ArtifactKind, MAX_ARTIFACT_KINDS),
            ("specializations", pb.Specialization, MAX_SPECIALIZATIONS),
        ):
            values = getattr(s, name)
            if len(values) > limit:
                self.fail(f"{path}.{name}", f"must have at most {limit} items, got {len(values)}")
                continue
            for i, value in enumerate(values):
                self.enum(f"{path}.{name}[{i}]", value, enum_type)
        if len(s.contributors) > self.limits.max_list_items:
            self.items(f"{path}.contributors", s.contributors)  # names the limit
            return
        for i, contributor in enumerate(s.contributors):
            self.identifier(f"{path}.contributors[{i}]", contributor)

    def present(self, path: str, parent: Message, field: str) -> bool:
        if not parent.HasField(field):
            self.fail(f"{path}.{field}" if path else field, "is required")
            return False
        return True

    # --- messages -----------------------------------------------------------

    def pattern(self, path: str, p: pb.Pattern) -> None:
        self.identifier(f"{path}.pattern_id", p.pattern_id)
        self.snake(f"{path}.pattern_type", p.pattern_type)
        self.enum(f"{path}.specialization", p.specialization, pb.Specialization)
        for name in ("complexity", "reusability", "performance_impact", "confidence"):
            self.fraction(f"{path}.{name}", getattr(p, name))
        self.attributes(f"{path}.attributes", p.attributes)

    def code_component(self, path: str, c: pb.CodeComponent) -> None:
        self.identifier(f"{path}.component_id", c.component_id)
        self.text(f"{path}.name", c.name, self.limits.max_name_length, required=True)
        self.snake(f"{path}.language", c.language)
        self.code(f"{path}.code", c.code)
        self.items(f"{path}.dependencies", c.dependencies)
        self.fraction(f"{path}.test_coverage", c.test_coverage)
        self.fraction(f"{path}.performance_score", c.performance_score)
        self.enum(f"{path}.specialization", c.specialization, pb.Specialization)
        self.attributes(f"{path}.attributes", c.attributes)
        self.entry_points(f"{path}.test_entry_points", c.test_entry_points)

    def entry_points(self, path: str, names: Iterable[str]) -> None:
        """Self-tests a validator calls from a generated harness: C identifiers, nothing else
        can reach its source."""
        names = list(names)
        if len(names) > self.limits.max_list_items:
            self.fail(
                path, f"must have at most {self.limits.max_list_items} items, got {len(names)}"
            )
            return
        for i, name in enumerate(names):
            if not C_SYMBOL.fullmatch(name) or name == "main":
                self.fail(
                    f"{path}[{i}]",
                    f"must be a C identifier of at most 64 characters, not main, got {name[:80]!r}",
                )

    def verdict(self, path: str, v: pb.ValidationVerdict) -> None:
        if v.state not in VERDICT_STATES:
            self.fail(
                f"{path}.state",
                "must be PASSED, FAILED, ERROR, UNSUPPORTED or TIMED_OUT, got "
                f"{pb.ValidationState.Name(v.state) if v.state in pb.ValidationState.values() else v.state}",
            )
        self.text(f"{path}.diagnostics", v.diagnostics)
        if v.tests_passed > v.tests_run:
            self.fail(f"{path}.tests_passed", f"must be at most tests_run ({v.tests_run})")
        self.fraction(f"{path}.line_coverage", v.line_coverage)
        self.non_negative(f"{path}.run_seconds", v.run_seconds)
        self.text(f"{path}.toolchain", v.toolchain, self.limits.max_name_length)
        if len(v.test_results) > self.limits.max_list_items:
            self.fail(
                f"{path}.test_results",
                f"must have at most {self.limits.max_list_items} items, got {len(v.test_results)}",
            )
        else:
            for i, result in enumerate(v.test_results):
                self.text(f"{path}.test_results[{i}].name", result.name, 64, required=True)
                self.text(f"{path}.test_results[{i}].detail", result.detail, 200)

    def os_component(self, path: str, c: pb.OsComponent) -> None:
        self.identifier(f"{path}.component_id", c.component_id)
        self.text(f"{path}.name", c.name, self.limits.max_name_length, required=True)
        self.snake(f"{path}.component_type", c.component_type)
        if not c.specializations:
            self.fail(f"{path}.specializations", "needs at least one specialization")
        elif len(c.specializations) > len(pb.Specialization.keys()):
            self.fail(f"{path}.specializations", f"has {len(c.specializations)} items, too many")
        else:
            for i, spec in enumerate(c.specializations):
                self.enum(f"{path}.specializations[{i}]", spec, pb.Specialization)
        self.snake(f"{path}.language", c.language)
        self.code(f"{path}.implementation", c.implementation)
        self.items(f"{path}.test_cases", c.test_cases)
        m = c.performance_metrics
        self.fraction(f"{path}.performance_metrics.cpu_usage", m.cpu_usage)
        self.non_negative(f"{path}.performance_metrics.memory_kib", m.memory_kib)
        self.non_negative(
            f"{path}.performance_metrics.execution_time_seconds", m.execution_time_seconds
        )
        self.fraction(f"{path}.quality_score", c.quality_score)
        self.attributes(f"{path}.attributes", c.attributes)
        self.entry_points(f"{path}.test_entry_points", c.test_entry_points)

    def code(self, path: str, code: str) -> None:
        size = len(code.encode())
        if not code.strip():
            self.fail(path, "is required")
        elif size > self.limits.max_code_bytes:
            self.fail(path, f"must be at most {self.limits.max_code_bytes} bytes, got {size}")
        elif "\x00" in code:
            self.fail(path, "must not contain NUL characters")

    def requirements(self, path: str, r: pb.FeatureRequirements) -> None:
        self.enum(f"{path}.performance", r.performance, pb.PerformanceLevel)
        self.enum(f"{path}.compatibility", r.compatibility, pb.Specialization, required=False)
        self.enum(f"{path}.priority", r.priority, pb.Priority)


def validate_agent_id(agent_id: str, limits: Limits) -> None:
    """The rule Hello applies to `agent_id`, for issuing tokens: a token for an id that can
    never say Hello is of no use."""
    check = _Checker(limits)
    check.identifier("agent_id", agent_id)
    if check.violations:
        raise invalid(check.violations)


def validate_hello(request: pb.ConnectRequest, limits: Limits) -> None:
    """The first message of a stream: its Hello, and its `message_id` checked like every other
    (but optional: Hello gets no receipt, and clients have always been free to leave it out)."""
    check = _Checker(limits)
    check.identifier("message_id", request.message_id, required=False)
    hello = request.hello
    check.identifier("hello.agent_id", hello.agent_id)
    check.enum("hello.specialization", hello.specialization, pb.Specialization)
    check.items("hello.capabilities", hello.capabilities, snake=True)
    check.text("hello.version", hello.version, limits.max_name_length)
    if hello.resume_after_seq >= 2**63:
        check.fail("hello.resume_after_seq", f"must be below 2^63, got {hello.resume_after_seq}")
    check.subscription("hello.subscription", hello.subscription)
    if check.violations:
        raise invalid(check.violations)


def validate_batch(request: pb.ConnectRequest, limits: Limits) -> None:
    """Refuse a batch as a whole (INVALID_ARGUMENT) unless every request in it may be
    handled on its own; the requests' contents are validated one by one afterwards."""
    check = _Checker(limits)
    check.identifier("message_id", request.message_id)
    requests = request.batch.requests
    if not requests:
        check.fail("batch.requests", "is empty; a batch carries at least one request")
    elif len(requests) > limits.max_batch_requests:
        # Refused before looking inside: 4 MiB can hold a million tiny requests.
        check.fail(
            "batch.requests",
            f"has {len(requests)} requests; at most {limits.max_batch_requests} "
            "(Welcome.max_batch_requests)",
        )
        raise invalid(check.violations)
    for index, item in enumerate(requests):
        if (kind := item.WhichOneof("body")) in ("hello", "batch"):
            check.fail(f"batch.requests[{index}]", f"is a {kind}; a batch carries other messages")
    if check.violations:
        raise invalid(check.violations)


def validate(request: pb.ConnectRequest, limits: Limits) -> str:
    """Raise `StatusError(INVALID_ARGUMENT)` listing every bad field; return the body's name."""
    check = _Checker(limits)
    check.identifier("message_id", request.message_id)
    kind = request.WhichOneof("body")
    if kind is None:
        raise invalid([*check.violations, ("body", "no message kind is set (the oneof is empty)")])
    if kind == "hello":
        raise failed_precondition("hello may be sent only once, as the first message")
    if kind == "batch":
        raise invalid([("batch", "a batch may not be inside another batch")])
    body = getattr(request, kind)
    if kind == "share_pattern":
        if check.present(kind, body, "pattern"):
            check.pattern(f"{kind}.pattern", body.pattern)
    elif kind == "share_code_component":
        if check.present(kind, body, "code_component"):
            check.code_component(f"{kind}.code_component", body.code_component)
    elif kind == "share_os_component":
        if check.present(kind, body, "os_component"):
            check.os_component(f"{kind}.os_component", body.os_component)
    elif kind == "request_feature":
        check.snake(f"{kind}.feature", body.feature)
        if check.present(kind, body, "requirements"):
            check.requirements(f"{kind}.requirements", body.requirements)
        check.text(f"{kind}.description", body.description)
    elif kind == "deliver_feature":
        check.identifier(f"{kind}.request_id", body.request_id)
        if check.present(kind, body, "component"):
            check.os_component(f"{kind}.component", body.component)
    elif kind == "propose_collaboration":
        check.identifier(f"{kind}.target_agent_id", body.target_agent_id)
        check.enum(f"{kind}.type", body.type, pb.CollaborationType)
        check.text(f"{kind}.description", body.description)
    elif kind in ("accept_collaboration", "decline_collaboration"):
        check.identifier(f"{kind}.session_id", body.session_id)
        if kind == "decline_collaboration":
            check.text(f"{kind}.reason", body.reason)
    elif kind == "report_collaboration_progress":
        check.identifier(f"{kind}.session_id", body.session_id)
        check.fraction(f"{kind}.progress", body.progress)
        check.text(f"{kind}.note", body.note)
    elif kind == "complete_collaboration":
        check.identifier(f"{kind}.session_id", body.session_id)
        if check.present(kind, body, "component"):
            check.os_component(f"{kind}.component", body.component)
    elif kind == "subscribe":
        check.subscription(f"{kind}.subscription", body.subscription)
    if check.violations:
        raise invalid(check.violations)
    return kind


def validate_verdict(request: pb.SubmitVerdictRequest, limits: Limits) -> None:
    """A validator's verdict, before it reaches the store: INVALID_ARGUMENT naming each field."""
    check = _Checker(limits)
    check.identifier("lease_id", request.lease_id)
    if check.present("", request, "verdict"):
        check.verdict("verdict", request.verdict)
    if check.violations:
        raise invalid(check.violations)

"""The decisions a trainer makes, behind one interface, so the simulation can
be swapped for a real model (`--behavior pkg.mod:Class`) without touching the
networking.

Every method receives a `BehaviorContext` with the trainer's identity, a
snapshot of its state and the `random.Random` to draw from: all randomness
comes from there, so a seed reproduces a run's decisions.
"""

from __future__ import annotations

import inspect
import pkgutil
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Protocol, runtime_checkable

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.simulation import codegen
from trainer_service.simulation.capabilities import Specialization, specialization_name

# The prototype's acceptance rules: never more than this many open sessions...
MAX_OPEN_COLLABORATIONS: Final = 3
# ...and otherwise accept this share of proposals.
ACCEPT_PROBABILITY: Final = 0.7
FEATURE_REQUEST_PROBABILITY: Final = 0.3
# Opportunities the hub scores below this are not worth a proposal.
MIN_OPPORTUNITY_SCORE: Final = 0.5
MAX_ID_LENGTH: Final = 128


@dataclass(frozen=True)
class TrainerState:
    """What the trainer knows about itself when it asks for a decision."""

    run_id: str = ""
    cycle: int = 0
    # Accepted sessions this trainer is working on (the target does the work).
    open_collaborations: int = 0
    # Its own proposals still waiting for an answer.
    pending_proposals: int = 0
    patterns_shared: int = 0
    components_shared: int = 0
    artifacts_known: int = 0
    peers: Mapping[str, Specialization] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class BehaviorContext:
    agent_id: str
    specialization: Specialization
    capabilities: tuple[str, ...]
    rng: random.Random
    state: TrainerState = field(default_factory=TrainerState)

    @property
    def specialization_name(self) -> str:
        return specialization_name(self.specialization)

    def partner_of(self, collaboration: pb.Collaboration) -> str:
        if collaboration.initiator_id == self.agent_id:
            return collaboration.target_id
        return collaboration.initiator_id


@runtime_checkable
class Behavior(Protocol):
    """What a trainer asks its brain. Returning None means "don't"."""

    async def generate_pattern(self, ctx: BehaviorContext) -> pb.Pattern: ...

    async def generate_code_component(self, ctx: BehaviorContext) -> pb.CodeComponent: ...

    async def choose_feature_request(self, ctx: BehaviorContext) -> pb.RequestFeature | None: ...

    async def build_feature(
        self, ctx: BehaviorContext, request: pb.FeatureRequestInfo
    ) -> pb.OsComponent | None: ...

    async def should_propose(
        self, ctx: BehaviorContext, opportunity: pb.CollaborationOpportunity
    ) -> bool: ...

    async def should_accept(
        self, ctx: BehaviorContext, collaboration: pb.Collaboration
    ) -> bool: ...

    async def progress_step(
        self, ctx: BehaviorContext, collaboration: pb.Collaboration
    ) -> float: ...

    async def collaborative_component(
        self, ctx: BehaviorContext, collaboration: pb.Collaboration
    ) -> pb.OsComponent: ...


_BEHAVIOR_METHODS: Final = (
    "generate_pattern",
    "generate_code_component",
    "choose_feature_request",
    "build_feature",
    "should_propose",
    "should_accept",
    "progress_step",
    "collaborative_component",
)


def _bounded_id(text: str) -> str:
    """The hub refuses ids over 128 characters; long agent ids must not make every share fail."""
    return text[:MAX_ID_LENGTH]


def _local_id(ctx: BehaviorContext, kind: str) -> str:
    """The trainer's own id for what it shares: unique across runs (run_id) and cycles."""
    run = f"{ctx.state.run_id}_" if ctx.state.run_id else ""
    return _bounded_id(f"{ctx.agent_id}_{kind}_{run}{ctx.state.cycle:05d}")


class SimulatedBehavior:
    """The prototype's simulated trainer: random but plausible numbers in its
    ranges, and real C from `codegen` instead of placeholder classes."""

    async def on_verdict(self, ctx: BehaviorContext, validated: pb.ArtifactValidated) -> None:
        """A verdict on one of its components: this simulation fixes nothing (the trainer
        has already logged and counted it)."""

    async def generate_pattern(self, ctx: BehaviorContext) -> pb.Pattern:
        rng = ctx.rng
        name = ctx.specialization_name
        return pb.Pattern(
            pattern_id=_local_id(ctx, "pattern"),
            pattern_type=f"{name}_pattern",
            specialization=ctx.specialization,
            complexity=rng.uniform(0.3, 0.9),
            reusability=rng.uniform(0.5, 1.0),
            performance_impact=rng.uniform(0.1, 0.8),
            confidence=rng.uniform(0.7, 0.95),
            attributes={"source": "simulated", "cycle": str(ctx.state.cycle)},
        )

    async def generate_code_component(self, ctx: BehaviorContext) -> pb.CodeComponent:
        rng = ctx.rng
        unit = codegen.generate_module(ctx.specialization, rng)
        return pb.CodeComponent(
            component_id=_local_id(ctx, "component"),
            name=unit.name,
            language="c",
            code=unit.code,
            dependencies=list(unit.dependencies),
            # test_coverage and performance_score stay unset: the validators' verdict
            # (Artifact.verdict) measures coverage; a claimed number would be a guess.
            specialization=ctx.specialization,
            test_entry_points=[unit.entry_point],
            attributes={"entry_point": unit.entry_point, "standard": "c99"},
        )

    async def choose_feature_request(self, ctx: BehaviorContext) -> pb.RequestFeature | None:
        rng = ctx.rng
        if rng.random() >= FEATURE_REQUEST_PROBABILITY:
            return None
        feature = rng.choice(codegen.FEATURES)
        priority = rng.choice((pb.PRIORITY_LOW, pb.PRIORITY_MEDIUM, pb.PRIORITY_HIGH))
        return pb.RequestFeature(
            feature=feature,
            requirements=pb.FeatureRequirements(
                performance=pb.PERFORMANCE_LEVEL_HIGH,
                compatibility=ctx.specialization,
                priority=priority,
            ),
            description=f"{feature} that fits a {ctx.specialization_name} component",
        )

    async def build_feature(
        self, ctx: BehaviorContext, request: pb.FeatureRequestInfo
    ) -> pb.OsComponent | None:
        if not codegen.is_known_feature(request.feature):
            return None
        rng = ctx.rng
        unit = codegen.generate_feature(request.feature, rng)
        return pb.OsComponent(
            component_id=_bounded_id(f"{ctx.agent_id}_{request.feature}_{request.request_id}"),
            name=request.feature,
            component_type="os_feature",
            specializations=[ctx.specialization],
            language="c",
            implementation=unit.code,
            test_cases=list(unit.test_cases),
            # No performance_metrics or quality_score: the verdict is the measurement.
            test_entry_points=[unit.entry_point],
            attributes={"request_id": request.request_id, "requester": request.requester_id},
        )

    async def should_propose(
        self, ctx: BehaviorContext, opportunity: pb.CollaborationOpportunity
    ) -> bool:
        """The hub already ranks complementary partners; propose to good ones while
        there is room for more work, with the score as the chance, so the best-ranked
        pairs don't take every proposal and lower-ranked partners still get asked."""
        waiting = ctx.state.pending_proposals
        if opportunity.score < MIN_OPPORTUNITY_SCORE or waiting >= MAX_OPEN_COLLABORATIONS:
            return False
        return ctx.rng.random() < opportunity.score

    async def should_accept(self, ctx: BehaviorContext, collaboration: pb.Collaboration) -> bool:
        if ctx.state.open_collaborations >= MAX_OPEN_COLLABORATIONS:
            return False
        return ctx.rng.random() < ACCEPT_PROBABILITY

    async def progress_step(self, ctx: BehaviorContext, collaboration: pb.Collaboration) -> float:
        return ctx.rng.uniform(0.2, 0.4)

    async def collaborative_component(
        self, ctx: BehaviorContext, collaboration: pb.Collaboration
    ) -> pb.OsComponent:
        rng = ctx.rng
        partner = ctx.partner_of(collaboration)
        partner_spec = ctx.state.peers.get(partner, pb.SPECIALIZATION_UNSPECIFIED)
        if partner_spec == pb.SPECIALIZATION_UNSPECIFIED:
            # Unknown partner: review our own module with a second pair of eyes.
            partner_spec = ctx.specialization
        try:
            type_name = pb.CollaborationType.Name(collaboration.type)
        except ValueError:  # a newer hub's type: still a collaboration
            type_name = "COLLABORATION_TYPE_COLLABORATIVE"
        type_name = type_name.removeprefix("COLLABORATION_TYPE_").lower()

        unit = codegen.generate_collaborative(
            ctx.specialization, partner_spec, rng, name=f"{type_name}_result"
        )
        specializations = [ctx.specialization]
        if partner_spec != ctx.specialization:
            specializations.append(partner_spec)
        return pb.OsComponent(
            component_id=_bounded_id(f"collab_{collaboration.session_id}"),
            name=unit.name,
            component_type="collaborative_component",
            specializations=specializations,
            language="c",
            implementation=unit.code,
            test_cases=list(unit.test_cases),
            test_entry_points=[unit.entry_point],
            attributes={
                "session_id": collaboration.session_id,
                "partners": f"{collaboration.initiator_id},{collaboration.target_id}",
            },
        )


@runtime_checkable
class VerdictHook(Protocol):
    """Optional beside `Behavior`: told of each verdict on this trainer's own components (a
    behaviour without it gets the trainer's default: logged and counted)."""

    async def on_verdict(self, ctx: BehaviorContext, validated: pb.ArtifactValidated) -> None: ...


def load_behavior(spec: str) -> Behavior:
    """Instantiates "package.module:ClassName" (no arguments) for --behavior.

    `pkgutil.resolve_name` does the import and the attribute walk; this only adds
    the checks around it. Raises ValueError with a message fit for the command line when the spec is
    malformed, the import fails, or the object lacks the Behavior methods.
    """
    module_name, sep, attr = spec.partition(":")
    dotted = [*module_name.split("."), *attr.split(".")]
    if not sep or not all(part.isidentifier() for part in dotted):
        raise ValueError(f"--behavior must look like package.module:ClassName, got {spec!r}")
    try:
        target: object = pkgutil.resolve_name(spec)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for --behavior: {exc}") from exc
    except AttributeError:
        raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    if not inspect.isclass(target):
        raise ValueError(f"{spec!r} is not a class")
    try:
        instance: object = target()
    except TypeError as exc:
        raise ValueError(f"cannot create {spec!r} without arguments: {exc}") from exc
    missing = [
        name
        for name in _BEHAVIOR_METHODS
        if not inspect.iscoroutinefunction(getattr(instance, name, None))
    ]
    if missing or not isinstance(instance, Behavior):
        raise ValueError(
            f"{spec!r} does not look like a Behavior: missing async method(s) {', '.join(missing)}"
        )
    return instance

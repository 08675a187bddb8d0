"""A user-supplied behaviour, loaded with --behavior tests.plugins.tagging_behavior:TaggingBehavior."""

from __future__ import annotations

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.simulation.behavior import BehaviorContext, SimulatedBehavior


class TaggingBehavior(SimulatedBehavior):
    """The simulation, but every pattern says it came from the plug-in."""

    async def generate_pattern(self, ctx: BehaviorContext) -> pb.Pattern:
        pattern = await super().generate_pattern(ctx)
        pattern.attributes["source"] = "plugin"
        return pattern

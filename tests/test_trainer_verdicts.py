"""How a trainer uses verdicts: the delivery it adopts among several for one request, and
that its simulated components declare their self-tests and claim no measurements."""

from __future__ import annotations

import random

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.simulation.behavior import BehaviorContext, SimulatedBehavior
from trainer_service.simulation.trainer import Deliveries


def test_a_requester_adopts_the_best_validated_delivery() -> None:
    deliveries = Deliveries()
    for artifact_id in ("a1", "a2", "a3"):
        deliveries.note(artifact_id, "feat_1")

    def verdict(artifact_id: str, state: int, coverage: float) -> pb.ArtifactValidated:
        return pb.ArtifactValidated(
            artifact_id=artifact_id,
            verdict=pb.ValidationVerdict(state=state, line_coverage=coverage),  # type: ignore[arg-type]
        )

    assert deliveries.judge(verdict("a1", pb.VALIDATION_STATE_FAILED, 0.9)) is None
    assert deliveries.judge(verdict("a2", pb.VALIDATION_STATE_PASSED, 0.5)) == ("feat_1", True)
    assert deliveries.judge(verdict("a3", pb.VALIDATION_STATE_PASSED, 0.4)) is None  # worse
    assert deliveries.judge(verdict("other", pb.VALIDATION_STATE_PASSED, 1.0)) is None


async def test_simulated_components_declare_self_tests_and_claim_nothing() -> None:
    ctx = BehaviorContext("AI_Node_1", pb.SPECIALIZATION_NETWORKING, (), random.Random(1))
    component = await SimulatedBehavior().generate_code_component(ctx)
    (entry,) = component.test_entry_points
    assert f"int {entry}(void)" in component.code
    assert component.test_coverage == 0 and component.performance_score == 0
    request = pb.FeatureRequestInfo(request_id="feat_1", feature="memory_allocator")
    feature = await SimulatedBehavior().build_feature(ctx, request)
    assert feature is not None and feature.quality_score == 0
    assert not feature.HasField("performance_metrics")
    (entry,) = feature.test_entry_points
    assert f"int {entry}(void)" in feature.implementation

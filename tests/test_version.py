"""One version: the hub, the SDK and the simulated trainer all report the installed
distribution's version (pyproject.toml is its only source)."""

from __future__ import annotations

from importlib.metadata import version

import hub_service
import trainer_service
from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.server import HubServer
from trainer_service.sdk.client import HubClient
from trainer_service.simulation.trainer import NetworkedKernelTrainer

from .conftest import HubHarness, target


async def test_hub_sdk_and_trainer_report_the_distribution_version(
    hub: HubServer, harness: HubHarness
) -> None:
    expected = version("kernelhub")
    assert hub_service.__version__ == trainer_service.__version__ == expected
    async with HubClient(
        target(hub),
        "AI_Node_1",
        await harness.token("AI_Node_1"),
        specialization=pb.SPECIALIZATION_NETWORKING,
    ) as client:
        assert client.welcome is not None and client.welcome.hub_version == expected
        assert (await client.stats()).hub_version == expected
        trainer = NetworkedKernelTrainer(
            "AI_Node_2", "graphics", target(hub), await harness.token("AI_Node_2"), tempo=20
        )
        await trainer.run(0.5)
        announced = {a.agent_id: a.version for a in (await client.list_agents()).agents}
    assert announced == {"AI_Node_1": expected, "AI_Node_2": expected}

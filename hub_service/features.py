"""Which capabilities can build which feature: the routing table for feature requests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from generated.kernelhub.v1 import hub_pb2 as pb


def feature_name(feature: pb.Feature.ValueType) -> str:
    """The name `RequestFeature.feature` carries: FEATURE_FILE_CACHE is "file_cache"."""
    return pb.Feature.Name(feature).removeprefix("FEATURE_").lower()


# A feature goes to agents announcing any of these capabilities (the contract's `Feature`
# comments list the same; tests/test_contract_docs.py keeps them equal).
FEATURE_CAPABILITIES: dict[str, frozenset[str]] = {
    feature_name(feature): frozenset(capabilities)
    for feature, capabilities in (
        (pb.FEATURE_MEMORY_ALLOCATOR, {"memory_management"}),
        (pb.FEATURE_FILE_CACHE, {"file_operations", "storage_management"}),
        (pb.FEATURE_NETWORK_STACK, {"network_protocols", "communication"}),
        (pb.FEATURE_GRAPHICS_DRIVER, {"graphics_rendering", "display_management"}),
        (pb.FEATURE_AUDIO_MIXER, {"audio_processing", "sound_synthesis"}),
        (pb.FEATURE_SECURITY_MODULE, {"security_analysis", "access_control", "encryption"}),
    )
}


def capable_agents(
    feature: str, requester: str, agents: Iterable[tuple[str, Iterable[str]]]
) -> list[str]:
    """Agents other than the requester that can build `feature`, sorted.

    An empty list means nobody fits (or the feature is unknown): the caller
    then broadcasts to every other agent.
    """
    wanted = FEATURE_CAPABILITIES.get(feature)
    if not wanted:
        return []
    return sorted(
        agent_id
        for agent_id, capabilities in agents
        if agent_id != requester and wanted.intersection(capabilities)
    )


def name_some(agents: Sequence[str], shown: int = 5) -> str:
    """The first few agent ids for an error message (routing lists may be long)."""
    names = ", ".join(agents[:shown])
    return f"{names} and {len(agents) - shown} more" if len(agents) > shown else names

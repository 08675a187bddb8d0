"""Which capabilities can build which feature: the routing table for feature requests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# A feature goes to agents announcing any of these capabilities.
FEATURE_CAPABILITIES: dict[str, frozenset[str]] = {
    "memory_allocator": frozenset({"memory_management"}),
    "file_cache": frozenset({"file_operations", "storage_management"}),
    "network_stack": frozenset({"network_protocols", "communication"}),
    "graphics_driver": frozenset({"graphics_rendering", "display_management"}),
    "audio_mixer": frozenset({"audio_processing", "sound_synthesis"}),
    "security_module": frozenset({"security_analysis", "access_control", "encryption"}),
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

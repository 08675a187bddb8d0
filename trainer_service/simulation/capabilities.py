"""The trainer's vocabulary of specializations and the capabilities each one
announces in Hello. Trainer-side only: the hub keeps its own model of which
specializations complement each other."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, TypeAlias

from generated.kernelhub.v1 import hub_pb2 as pb

Specialization: TypeAlias = pb.Specialization.ValueType

_PREFIX: Final = "SPECIALIZATION_"

# Short names in the prototype's order; the swarm cycles through them in this order.
SPECIALIZATION_NAMES: Final[tuple[str, ...]] = (
    "window_manager",
    "file_system",
    "process_manager",
    "security",
    "networking",
    "graphics",
    "audio",
    "performance",
)

BASE_CAPABILITIES: Final[tuple[str, ...]] = (
    "pattern_recognition",
    "code_generation",
    "os_development",
)

SPECIALIZATION_CAPABILITIES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "window_manager": ("gui_development", "window_management", "user_interface"),
        "file_system": ("file_operations", "storage_management", "data_structures"),
        "process_manager": ("process_scheduling", "memory_management", "system_calls"),
        "security": ("security_analysis", "encryption", "access_control"),
        "networking": ("network_protocols", "distributed_systems", "communication"),
        "graphics": ("graphics_rendering", "visual_effects", "display_management"),
        "audio": ("audio_processing", "sound_synthesis", "media_handling"),
        "performance": ("optimization", "benchmarking", "performance_analysis"),
    }
)


def all_specializations() -> tuple[Specialization, ...]:
    """Every concrete specialization (never UNSPECIFIED), in SPECIALIZATION_NAMES order."""
    return tuple(parse_specialization(name) for name in SPECIALIZATION_NAMES)


def parse_specialization(name: str) -> Specialization:
    """Accepts "networking", "NETWORKING", "window-manager" or the full enum name;
    raises ValueError naming the valid choices otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key.startswith(_PREFIX.lower()):
        key = key[len(_PREFIX) :]
    if key not in SPECIALIZATION_CAPABILITIES:
        choices = ", ".join(SPECIALIZATION_NAMES)
        raise ValueError(f"unknown specialization {name!r}; choose one of: {choices}")
    return pb.Specialization.Value(_PREFIX + key.upper())


def specialization_name(specialization: Specialization) -> str:
    """The short name ("networking"); "unspecified" for 0 and unknown numbers, so
    a newer hub's enum values never crash logging."""
    try:
        full = pb.Specialization.Name(specialization)
    except ValueError:
        return "unspecified"
    short = full[len(_PREFIX) :].lower()
    return short if short in SPECIALIZATION_CAPABILITIES else "unspecified"


def capabilities_for(specialization: Specialization | str) -> list[str]:
    """Base capabilities followed by the specialization's own, as sent in Hello."""
    name = (
        specialization_name(parse_specialization(specialization))
        if isinstance(specialization, str)
        else specialization_name(specialization)
    )
    return [*BASE_CAPABILITIES, *SPECIALIZATION_CAPABILITIES.get(name, ())]

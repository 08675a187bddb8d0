"""Which specializations make good collaborators: the hub's one model of it.

The prototype compared a peer's *specialization* with lists of *capability*
names, so most pairs could never match. Here the model is a relation between
specializations, symmetric by construction (if A complements B, B complements
A), each pair with a score and a reason that trainers can show.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from generated.kernelhub.v1 import hub_pb2 as pb

S = pb.Specialization


@dataclass(frozen=True)
class Complement:
    score: float
    reason: str


# Each unordered pair once; `complement()` reads it both ways.
_PAIRS: dict[frozenset[int], Complement] = {
    frozenset({S.SPECIALIZATION_WINDOW_MANAGER, S.SPECIALIZATION_GRAPHICS}): Complement(
        0.95, "windows are drawn by the graphics stack"
    ),
    frozenset({S.SPECIALIZATION_FILE_SYSTEM, S.SPECIALIZATION_PROCESS_MANAGER}): Complement(
        0.8, "page cache and memory management share the same pages"
    ),
    frozenset({S.SPECIALIZATION_FILE_SYSTEM, S.SPECIALIZATION_SECURITY}): Complement(
        0.85, "file permissions and encryption at rest"
    ),
    frozenset({S.SPECIALIZATION_FILE_SYSTEM, S.SPECIALIZATION_NETWORKING}): Complement(
        0.75, "network and distributed file systems"
    ),
    frozenset({S.SPECIALIZATION_PROCESS_MANAGER, S.SPECIALIZATION_SECURITY}): Complement(
        0.85, "process isolation and access control"
    ),
    frozenset({S.SPECIALIZATION_PROCESS_MANAGER, S.SPECIALIZATION_PERFORMANCE}): Complement(
        0.9, "scheduler tuning needs measurement"
    ),
    frozenset({S.SPECIALIZATION_NETWORKING, S.SPECIALIZATION_SECURITY}): Complement(
        0.9, "secure transport and firewalls"
    ),
    frozenset({S.SPECIALIZATION_NETWORKING, S.SPECIALIZATION_PERFORMANCE}): Complement(
        0.8, "throughput and latency of the network stack"
    ),
    frozenset({S.SPECIALIZATION_GRAPHICS, S.SPECIALIZATION_PERFORMANCE}): Complement(
        0.8, "frame pacing and GPU efficiency"
    ),
    frozenset({S.SPECIALIZATION_GRAPHICS, S.SPECIALIZATION_AUDIO}): Complement(
        0.7, "audio/video synchronisation for media"
    ),
    frozenset({S.SPECIALIZATION_AUDIO, S.SPECIALIZATION_PROCESS_MANAGER}): Complement(
        0.75, "real-time scheduling for glitch-free audio"
    ),
    frozenset({S.SPECIALIZATION_AUDIO, S.SPECIALIZATION_WINDOW_MANAGER}): Complement(
        0.6, "per-window sound and notifications"
    ),
    frozenset({S.SPECIALIZATION_WINDOW_MANAGER, S.SPECIALIZATION_SECURITY}): Complement(
        0.65, "trusted input paths and screen locking"
    ),
}


def complement(a: int, b: int) -> Complement | None:
    """How `a` and `b` complement each other, or None. Same specialization never does."""
    if a == b:
        return None
    return _PAIRS.get(frozenset({a, b}))


def complements(specialization: int) -> list[int]:
    """The specializations that complement `specialization`, best first (ties by number)."""
    found = [
        (-fit.score, other)
        for other in pb.Specialization.values()
        if other and (fit := complement(specialization, other)) is not None
    ]
    return [other for _, other in sorted(found)]


@dataclass(frozen=True)
class Candidate:
    agent_id: str
    specialization: int


def opportunities(
    me: str, my_specialization: int, others: Iterable[Candidate], limit: int = 10
) -> list[pb.CollaborationOpportunity]:
    """Best partners for `me` among `others`, highest score first, ties by agent id."""
    found = []
    for other in others:
        if other.agent_id == me:
            continue
        fit = complement(my_specialization, other.specialization)
        if fit is not None:
            found.append((-fit.score, other.agent_id, other.specialization, fit))
    found.sort()
    return [
        pb.CollaborationOpportunity(
            agent_id=agent_id,
            specialization=pb.Specialization.ValueType(spec),
            score=fit.score,
            reason=fit.reason,
        )
        for _, agent_id, spec, fit in found[:limit]
    ]

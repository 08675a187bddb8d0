"""The complementarity model: a symmetric relation between specializations, and who to pair with."""

from __future__ import annotations

import itertools

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.complementarity import Candidate, complement, opportunities

from .conftest import HubHarness, hello

SPECIALIZATIONS = [v for v in pb.Specialization.values() if v != pb.SPECIALIZATION_UNSPECIFIED]
NAME = pb.Specialization.Name


def test_there_are_eight_specializations() -> None:
    assert len(SPECIALIZATIONS) == 8


@pytest.mark.parametrize(
    ("a", "b"),
    list(itertools.combinations(SPECIALIZATIONS, 2)),
    ids=lambda s: NAME(s).removeprefix("SPECIALIZATION_"),
)
def test_the_relation_is_symmetric(a: int, b: int) -> None:
    assert complement(a, b) == complement(b, a)


@pytest.mark.parametrize("s", SPECIALIZATIONS, ids=NAME)
def test_no_specialization_complements_itself(s: int) -> None:
    assert complement(s, s) is None


@pytest.mark.parametrize("s", SPECIALIZATIONS, ids=NAME)
def test_every_specialization_has_a_complement(s: int) -> None:
    assert [o for o in SPECIALIZATIONS if complement(s, o) is not None]


@pytest.mark.parametrize("s", SPECIALIZATIONS, ids=NAME)
def test_unspecified_complements_nothing(s: int) -> None:
    assert complement(pb.SPECIALIZATION_UNSPECIFIED, s) is None
    assert complement(s, pb.SPECIALIZATION_UNSPECIFIED) is None


def test_scores_are_in_range_with_reasons() -> None:
    pairs = [
        (a, b, fit)
        for a, b in itertools.combinations(SPECIALIZATIONS, 2)
        if (fit := complement(a, b)) is not None
    ]
    assert pairs
    for a, b, fit in pairs:
        assert 0.0 < fit.score <= 1.0, (NAME(a), NAME(b))
        assert fit.reason.strip(), (NAME(a), NAME(b))


def test_known_pairings() -> None:
    wm_graphics = complement(pb.SPECIALIZATION_WINDOW_MANAGER, pb.SPECIALIZATION_GRAPHICS)
    assert wm_graphics is not None and wm_graphics.score == 0.95
    assert complement(pb.SPECIALIZATION_NETWORKING, pb.SPECIALIZATION_SECURITY) is not None
    assert complement(pb.SPECIALIZATION_AUDIO, pb.SPECIALIZATION_NETWORKING) is None


# --- opportunities -----------------------------------------------------------------


PM = pb.SPECIALIZATION_PROCESS_MANAGER


def candidates() -> list[Candidate]:
    return [
        Candidate("zed", pb.SPECIALIZATION_AUDIO),  # 0.75
        Candidate("bob", pb.SPECIALIZATION_PERFORMANCE),  # 0.9
        Candidate("amy", pb.SPECIALIZATION_PERFORMANCE),  # 0.9, ties with bob
        Candidate("cat", pb.SPECIALIZATION_SECURITY),  # 0.85
        Candidate("dan", pb.SPECIALIZATION_FILE_SYSTEM),  # 0.8
        Candidate("eve", pb.SPECIALIZATION_GRAPHICS),  # not a complement of PM
        Candidate("fay", PM),  # same specialization
        Candidate("me", pb.SPECIALIZATION_PERFORMANCE),  # myself, whatever it says
    ]


def test_opportunities_best_first_ties_by_agent_id() -> None:
    found = opportunities("me", PM, candidates(), limit=10)
    assert [(o.agent_id, o.score) for o in found] == [
        ("amy", 0.9),
        ("bob", 0.9),
        ("cat", 0.85),
        ("dan", 0.8),
        ("zed", 0.75),
    ]
    for o in found:
        fit = complement(PM, o.specialization)
        assert fit is not None and (o.score, o.reason) == (fit.score, fit.reason)
    assert [o.specialization for o in found[:2]] == [pb.SPECIALIZATION_PERFORMANCE] * 2


def test_opportunities_exclude_self_and_non_complements() -> None:
    ids = {o.agent_id for o in opportunities("me", PM, candidates(), limit=100)}
    assert not ids & {"me", "eve", "fay"}
    assert opportunities("me", PM, [Candidate("me", pb.SPECIALIZATION_PERFORMANCE)]) == []
    assert opportunities("me", PM, []) == []


@pytest.mark.parametrize("limit", [0, 1, 2, 5])
def test_opportunities_honour_the_limit(limit: int) -> None:
    found = opportunities("me", PM, candidates(), limit=limit)
    assert [o.agent_id for o in found] == ["amy", "bob", "cat", "dan", "zed"][:limit]


def test_opportunities_default_to_ten() -> None:
    many = [Candidate(f"perf_{i:02d}", pb.SPECIALIZATION_PERFORMANCE) for i in range(12)]
    assert [o.agent_id for o in opportunities("me", PM, many)] == [
        f"perf_{i:02d}" for i in range(10)
    ]


def test_opportunities_accept_a_generator() -> None:
    found = opportunities("me", PM, (c for c in candidates()), limit=1)
    assert [o.agent_id for o in found] == ["amy"]


# --- through the hub -------------------------------------------------------------------


async def test_training_sync_suggests_complements_best_first(harness: HubHarness) -> None:
    for agent, spec in (
        ("AI_Node_A", pb.SPECIALIZATION_AUDIO),
        ("AI_Node_B", pb.SPECIALIZATION_PERFORMANCE),
        ("AI_Node_C", pb.SPECIALIZATION_GRAPHICS),
        ("AI_Node_D", pb.SPECIALIZATION_SECURITY),
        ("AI_Node_0", pb.SPECIALIZATION_PERFORMANCE),
    ):
        await harness.connect(agent, hello(agent, spec, capabilities=[]))
    newcomer = await harness.connect("AI_Node_P", hello("AI_Node_P", PM, capabilities=[]))
    while not newcomer.syncs:
        await newcomer._read_one()
    sync = newcomer.syncs[-1]
    assert sorted(a.agent_id for a in sync.active_agents) == [
        "AI_Node_0",
        "AI_Node_A",
        "AI_Node_B",
        "AI_Node_C",
        "AI_Node_D",
    ]
    assert [(o.agent_id, o.score) for o in sync.opportunities] == [
        ("AI_Node_0", 0.9),
        ("AI_Node_B", 0.9),
        ("AI_Node_D", 0.85),
        ("AI_Node_A", 0.75),
    ]
    assert all(o.reason for o in sync.opportunities)

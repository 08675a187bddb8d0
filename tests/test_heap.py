"""Giving freed memory back to the OS after a burst (`heap.Trimmer`), read off given clocks."""

from __future__ import annotations

import sys

import pytest

from hub_service import heap


class Clocks:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def run(self, cores: float, seconds: float = 0.25) -> None:
        self.cpu += cores * seconds
        self.wall += seconds


def trimmer(clocks: Clocks) -> heap.Trimmer:
    return heap.Trimmer(cpu=lambda: clocks.cpu, clock=lambda: clocks.wall)


def test_it_trims_once_when_a_busy_spell_is_over() -> None:
    clocks = Clocks()
    trim = trimmer(clocks)
    decisions = []
    for cores in (1.0, 1.0, 0.8, 0.0, 0.0, 0.0):  # a storm of 0.7 CPU seconds, then quiet
        clocks.run(cores)
        decisions.append(trim.due())
    assert decisions == [False, False, False, True, False, False]
    assert trim.trims == 1


def test_an_idle_hub_never_trims() -> None:
    """A sliver of CPU now and then never adds up to a spell worth a trim... for a while."""
    clocks = Clocks()
    trim = trimmer(clocks)
    for _ in range(40):  # ten seconds at 0.02 cores: 0.2 CPU seconds, under the 0.25
        clocks.run(0.02)
        assert not trim.due()


def test_no_trim_while_still_busy() -> None:
    clocks = Clocks()
    trim = trimmer(clocks)
    for _ in range(20):
        clocks.run(0.5)
        assert not trim.due()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_is_found_and_runs() -> None:
    """On this (glibc) machine the hub trims for real; it returns 1 or 0, never raises."""
    assert heap.malloc_trim is not None
    assert heap.malloc_trim() in (0, 1)

"""The load factor every linger follows (`lingers.LoadFollower`), read off a given CPU clock."""

from __future__ import annotations

import pytest

from hub_service.lingers import HIGH, LOW, Linger, LoadFollower


class Clocks:
    """A process that uses `cores` of CPU while time passes in steps of 50 ms."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    def run(self, cores: float, seconds: float = 0.05) -> None:
        self.cpu += cores * seconds
        self.wall += seconds


def follower(clocks: Clocks, *lingers: Linger) -> LoadFollower:
    return LoadFollower(lingers, cpu=lambda: clocks.cpu, clock=lambda: clocks.wall)


def settle(clocks: Clocks, follower: LoadFollower, cores: float, samples: int = 60) -> None:
    for _ in range(samples):
        clocks.run(cores)
        follower.sample()


def test_an_idle_hub_lingers_not_at_all_a_busy_one_in_full() -> None:
    clocks = Clocks()
    stream, commit = Linger(0.005), Linger(0.002)
    load = follower(clocks, stream, commit)
    assert (stream.seconds, commit.seconds) == (0.0, 0.0), "nothing measured yet: no linger"
    settle(clocks, load, LOW / 2)
    assert (stream.seconds, commit.seconds) == (0.0, 0.0)
    settle(clocks, load, 1.0)
    assert stream.seconds == pytest.approx(0.005) and commit.seconds == pytest.approx(0.002)
    settle(clocks, load, 1.7)  # gRPC's threads on other cores: never past the longest
    assert stream.seconds == pytest.approx(0.005)
    settle(clocks, load, 0.0)
    assert stream.seconds == 0.0


def test_between_the_thresholds_the_linger_is_in_proportion() -> None:
    clocks = Clocks()
    stream = Linger(0.004)
    load = follower(clocks, stream)
    settle(clocks, load, (LOW + HIGH) / 2)
    assert stream.seconds == pytest.approx(0.002, rel=1e-3)


def test_one_burst_does_not_swing_it() -> None:
    """A single busy sample among idle ones: the average stays under LOW."""
    clocks = Clocks()
    stream = Linger(0.005)
    load = follower(clocks, stream)
    settle(clocks, load, 0.1)
    clocks.run(1.0)
    load.sample()
    assert stream.seconds == 0.0
    settle(clocks, load, 1.0, samples=3)  # sustained: it follows within a few samples
    assert stream.seconds > 0.0


def test_no_time_passed_changes_nothing() -> None:
    """Two samples in the same clock tick (no division by zero, no jump)."""
    clocks = Clocks()
    stream = Linger(0.005)
    load = follower(clocks, stream)
    settle(clocks, load, 1.0)
    clocks.cpu += 1.0
    load.sample()
    assert stream.seconds == pytest.approx(0.005)
    assert load.factor == 1.0


def test_reported_factor() -> None:
    """`on_factor` hears every new factor (the kernelhub_linger_factor gauge)."""
    clocks = Clocks()
    heard: list[float] = []
    load = LoadFollower(
        [Linger(0.005)], cpu=lambda: clocks.cpu, clock=lambda: clocks.wall, on_factor=heard.append
    )
    settle(clocks, load, 1.0, samples=20)
    assert heard[0] == 0.0 and heard[-1] == 1.0

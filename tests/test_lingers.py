"""The load factor each linger follows (`lingers.LoadFollower`), read off given clocks."""

from __future__ import annotations

import pytest

from hub_service.lingers import HIGH, LOW, Linger, LoadFollower


class Clocks:
    """Time passing in steps of 50 ms, and busy-seconds clocks (a process's CPU, the time
    spent committing) running at given rates meanwhile."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0
        self.committing = 0.0

    def run(self, cores: float, committing: float = 0.0, seconds: float = 0.05) -> None:
        self.cpu += cores * seconds
        self.committing += committing * seconds
        self.wall += seconds


def linger(clocks: Clocks, longest: float, *, commits: bool = False) -> Linger:
    if commits:
        return Linger("commit", longest, (lambda: clocks.cpu, lambda: clocks.committing))
    return Linger("stream", longest, (lambda: clocks.cpu,))


def follower(clocks: Clocks, *lingers: Linger) -> LoadFollower:
    return LoadFollower(lingers, clock=lambda: clocks.wall)


def settle(
    clocks: Clocks,
    load: LoadFollower,
    cores: float,
    committing: float = 0.0,
    samples: int = 60,
    late: float = 0.0,
) -> None:
    for _ in range(samples):
        clocks.run(cores, committing)
        load.sample(late)


def test_an_idle_hub_lingers_not_at_all_a_busy_one_in_full() -> None:
    clocks = Clocks()
    stream, commit = linger(clocks, 0.005), linger(clocks, 0.002, commits=True)
    load = follower(clocks, stream, commit)
    assert (stream.seconds, commit.seconds) == (0.0, 0.0), "nothing measured yet: no linger"
    settle(clocks, load, LOW / 2)
    assert (stream.seconds, commit.seconds) == (0.0, 0.0)
    settle(clocks, load, 1.0)
    assert stream.seconds == pytest.approx(0.005) and commit.seconds == pytest.approx(0.002)
    settle(clocks, load, 1.7)  # gRPC's threads on other cores: never past the longest
    assert stream.seconds == pytest.approx(0.005) and stream.factor == 1.0
    settle(clocks, load, 0.0)
    assert stream.seconds == 0.0


def test_between_the_thresholds_the_linger_is_in_proportion() -> None:
    clocks = Clocks()
    stream = linger(clocks, 0.004)
    load = follower(clocks, stream)
    settle(clocks, load, (LOW + HIGH) / 2)
    assert stream.seconds == pytest.approx(0.002, rel=1e-3)


def test_the_commit_linger_follows_the_busier_of_its_clocks() -> None:
    """A hub process with CPU to spare whose commits keep the writer busy: the commits
    linger (they share the writer's fixed cost), the streams do not."""
    clocks = Clocks()
    stream, commit = linger(clocks, 0.005), linger(clocks, 0.002, commits=True)
    load = follower(clocks, stream, commit)
    settle(clocks, load, cores=0.2, committing=0.9)
    assert stream.seconds == 0.0
    assert commit.seconds == pytest.approx(0.002)


def test_a_starved_loop_is_busy_whatever_its_cpu() -> None:
    """The sampler woke late (runnable, not run: another process had the core): that
    counts as busy, so the hub batches when CPU is short."""
    clocks = Clocks()
    stream = linger(clocks, 0.005)
    load = follower(clocks, stream)
    settle(clocks, load, cores=0.1, late=0.045)  # 45 ms late in every 50 ms step
    assert stream.factor == 1.0


def test_one_burst_does_not_swing_it() -> None:
    """A single busy sample among idle ones: the average stays under LOW."""
    clocks = Clocks()
    stream = linger(clocks, 0.005)
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
    stream = linger(clocks, 0.005)
    load = follower(clocks, stream)
    settle(clocks, load, 1.0)
    clocks.cpu += 1.0
    load.sample()
    assert stream.seconds == pytest.approx(0.005)
    assert stream.factor == 1.0


def test_every_new_factor_is_reported() -> None:
    """`on_factor` hears each linger's factor (the kernelhub_linger_factor gauge)."""
    clocks = Clocks()
    heard: list[tuple[str, float]] = []
    stream = linger(clocks, 0.005)
    load = LoadFollower(
        [stream], clock=lambda: clocks.wall, on_factor=lambda it: heard.append((it.name, it.factor))
    )
    settle(clocks, load, 1.0, samples=20)
    assert heard[0] == ("stream", 0.0) and heard[-1] == ("stream", 1.0)

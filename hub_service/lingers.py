"""Lingers that follow the hub's load.

A linger trades latency for CPU: events that wait a few milliseconds share one gRPC write
(tens of microseconds of the event loop each), commands share one group commit. The trade
pays only while CPU is short. At 200-800 shares/s to 50 trainers a fixed 5 ms stream linger
roughly doubled the median share -> delivery time against none, for no CPU saved that the
hub needed (docs/benchmarks.md); near saturation it is what keeps the writes few and full.

So each linger is its setting (`longest`) times one load factor: none while the hub's
process uses less than `LOW` of a core, all of it from `HIGH` on, in proportion between.
The load is the process's CPU time over wall time (its gRPC threads included, its writer
process not: that one has a core of its own), averaged over a few samples so that one burst
does not swing it. With `lingers_follow_load` off the factor stays 1: fixed lingers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LOW = 0.5  # of a core: below it nobody lingers
HIGH = 0.8  # of a core: from here on every linger is at its longest
INTERVAL = 0.05  # seconds between samples
SMOOTHING = 0.3  # weight of the newest sample in the running average (~0.15 s of memory)


@dataclass(slots=True)
class Linger:
    """How long to linger now; read each time by whoever lingers."""

    longest: float  # the setting
    seconds: float = -1.0  # now (-1: not set, i.e. `longest`)

    def __post_init__(self) -> None:
        if self.seconds < 0:
            self.seconds = self.longest


class LoadFollower:
    """Samples the process's CPU use and sets every linger's length from it."""

    def __init__(
        self,
        lingers: Sequence[Linger],
        *,
        cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        on_factor: Callable[[float], None] = lambda factor: None,
    ) -> None:
        self._lingers = tuple(lingers)
        self._cpu = cpu
        self._clock = clock
        self._on_factor = on_factor
        self._last: tuple[float, float] | None = None
        self.load = 0.0  # cores, averaged
        self.factor = 0.0
        self._apply()

    def sample(self) -> None:
        """One reading: the CPU used since the last one, over the time that passed."""
        now = (self._cpu(), self._clock())
        if self._last is not None and now[1] > self._last[1]:
            cores = (now[0] - self._last[0]) / (now[1] - self._last[1])
            self.load += SMOOTHING * (cores - self.load)
            self.factor = min(1.0, max(0.0, (self.load - LOW) / (HIGH - LOW)))
            self._apply()
        self._last = now

    def _apply(self) -> None:
        for linger in self._lingers:
            linger.seconds = linger.longest * self.factor
        self._on_factor(self.factor)

    async def run(self) -> None:
        """Sample every INTERVAL until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(INTERVAL)

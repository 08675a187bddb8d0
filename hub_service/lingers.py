"""Lingers that follow the hub's load.

A linger trades latency for CPU: events that wait a few milliseconds share one gRPC write
(tens of microseconds of the event loop each), commands share one group commit. The trade
pays only while what it saves is short. At 200-800 shares/s to 50 trainers a fixed 5 ms
stream linger roughly doubled the median share -> delivery time against none, for CPU the
hub did not need (docs/benchmarks.md); near saturation it is what keeps the writes few and
full.

So each linger is its setting (`longest`) times a load factor: none while its load is under
`LOW`, all of it from `HIGH` on, in proportion between. A load is the busiest of the linger's
clocks (busy seconds per second: the process's CPU time, its gRPC threads included; the time
the group commit spends committing, which is the writer's work), plus how late the sampler
itself woke (a loop that is starved of a core, or behind its ready queue, is busy whatever
its CPU says). It is averaged over a few samples, so one burst does not swing it. With
`lingers_follow_load` off the factor stays 1: fixed lingers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LOW = 0.5  # busy seconds per second: below it nobody lingers
HIGH = 0.8  # from here on a linger is at its longest
INTERVAL = 0.05  # seconds between samples
SMOOTHING = 0.3  # weight of the newest sample in the running average (~0.15 s of memory)

Clock = Callable[[], float]  # seconds, cumulative


@dataclass(slots=True)
class Linger:
    """How long to linger now (`seconds`, read by whoever lingers, each time), and what
    load it follows: the busiest of `clocks`."""

    name: str  # its label on kernelhub_linger_factor
    longest: float  # the setting
    clocks: tuple[Clock, ...] = (time.process_time,)
    seconds: float = field(init=False)
    factor: float = field(init=False, default=1.0)
    load: float = field(init=False, default=0.0)  # busy seconds per second, averaged
    _last: tuple[float, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.seconds = self.longest


class LoadFollower:
    """Samples every linger's clocks each INTERVAL and sets its length from them."""

    def __init__(
        self,
        lingers: Sequence[Linger],
        *,
        clock: Clock = time.monotonic,
        on_factor: Callable[[Linger], None] = lambda linger: None,
    ) -> None:
        self._lingers = tuple(lingers)
        self._clock = clock
        self._on_factor = on_factor
        self._last_sample: float | None = None
        for linger in self._lingers:  # nothing measured yet: no linger
            self._set(linger, 0.0)

    def sample(self, late: float = 0.0) -> None:
        """One reading: each clock's busy seconds since the last one over the time that
        passed, plus `late` (the seconds the sampler woke after it was due)."""
        now = self._clock()
        since = None if self._last_sample is None else now - self._last_sample
        self._last_sample = now
        for linger in self._lingers:
            readings = tuple(read() for read in linger.clocks)
            if since is not None and since > 0 and linger._last:
                busiest = max(b - a for a, b in zip(linger._last, readings, strict=True))
                load = (busiest + max(0.0, late)) / since
                linger.load += SMOOTHING * (load - linger.load)
                self._set(linger, min(1.0, max(0.0, (linger.load - LOW) / (HIGH - LOW))))
            linger._last = readings

    def _set(self, linger: Linger, factor: float) -> None:
        linger.factor = factor
        linger.seconds = linger.longest * factor
        self._on_factor(linger)

    async def run(self) -> None:
        """Sample every INTERVAL until cancelled; a sample that fails is logged, and the
        lingers keep their lengths until the next one."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                self.sample(late=loop.time() - due)
            except Exception:
                log.exception("sampling the hub's load failed")
            due = loop.time() + INTERVAL
            await asyncio.sleep(INTERVAL)

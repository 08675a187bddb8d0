"""The heap of a long-running hub process: the garbage collector's settings (the server and
its writer), and giving freed memory back to the OS after a burst (`Trimmer`, the server).

Profiled under durable ingest (py-spy, native frames), the collector took ~15% of the server's
samples and ~8% of the writer's, most of it from the unpickling of each commit's outcomes.
CPython's default young collection, every 700 net container allocations, promotes whatever
lives a few milliseconds (a command in flight, its outcome) to the old generation, whose full
collections then walk the whole heap, the startup's modules and descriptors included. So once
a process has started, what it built is frozen out of every collection, and young collections
run less often. Reference counting still frees every acyclic object at once; only cycles wait
for a collection, and there are never more than `YOUNG_THRESHOLD` new containers between two.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable

# Container allocations (net of frees) between two young collections: CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once the process has started: its modules and setup are kept out of collections."""
    gc.collect()  # what the start left as garbage is not frozen with the rest
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)


def _find_malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


malloc_trim = _find_malloc_trim()


class Trimmer:
    """Gives the heap's free pages back to the OS once a busy spell is over.

    A connect storm builds rosters, welcomes and commits for thousands of streams at once;
    once sent, that memory is free but glibc keeps it, and the process's RSS stays at the
    storm's high-water mark (docs/benchmarks.md has what trimming gives back). So after at least `worth` seconds of CPU since the last trim, the
    first sample in which the process is quiet (under `quiet` of a core) trims, on a thread
    (ctypes lets go of the GIL; the loop goes on)."""

    def __init__(
        self,
        *,
        interval: float = 0.25,
        quiet: float = 0.05,
        worth: float = 0.25,
        cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._quiet = quiet
        self._worth = worth
        self._cpu = cpu
        self._clock = clock
        self._last = (cpu(), clock())
        self._busy = 0.0  # CPU seconds since the last trim
        self.trims = 0

    def due(self) -> bool:
        """One sample: whether to trim now."""
        cpu, now = self._cpu(), self._clock()
        used, passed = cpu - self._last[0], now - self._last[1]
        self._last = (cpu, now)
        self._busy += used
        if passed <= 0 or self._busy < self._worth or used / passed >= self._quiet:
            return False
        self._busy = 0.0
        self.trims += 1
        return True

    async def run(self) -> None:
        """Until cancelled (nothing to do where there is no malloc_trim)."""
        if malloc_trim is None:
            return
        while True:
            await asyncio.sleep(self._interval)
            if self.due():
                await asyncio.to_thread(malloc_trim)

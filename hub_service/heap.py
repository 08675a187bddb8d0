"""The garbage collector's settings for a long-running hub process: the server, and its writer.

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

import gc

# Container allocations (net of frees) between two young collections: CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Call once the process has started: its modules and setup are kept out of collections."""
    gc.collect()  # what the start left as garbage is not frozen with the rest
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)

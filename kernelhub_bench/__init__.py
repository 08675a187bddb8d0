"""kernelhub's benchmark suite: the hub against in-run baselines (see docs/benchmarks.md).

Three kinds of process take part in a run, so that none of them measures itself:
the orchestrator (`kernelhub_bench.cli`), the server under test (the hub, or one
of the baselines in `kernelhub_bench.baselines`) and the load
(`kernelhub_bench.load`, many simulated trainers on one event loop).
"""

import importlib.metadata
import os

# Before gRPC loads: its fork support off (grpc/grpc#43055; why: hub_service/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = importlib.metadata.version("kernelhub")  # pyproject.toml is the one source

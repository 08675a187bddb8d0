"""kernelhub-validator: takes shared components from the hub, builds and tests them in a
sandbox, and reports each verdict. A client of the hub's contract only (generated code)."""

from __future__ import annotations

import os

# Before gRPC loads: its fork support off (grpc/grpc#43055; why: hub_service/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"

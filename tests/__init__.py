"""The test suite."""

import os

# Before gRPC loads: its fork support off (grpc/grpc#43055; why: hub_service/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

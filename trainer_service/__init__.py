"""The kernelhub trainer package: the SDK a user imports (`trainer_service.sdk`,
whose public names are re-exported here) and the simulated trainers built on it
(`trainer_service.simulation`, imported only by what runs them)."""

import importlib.metadata
import os

# Before gRPC loads: its fork support off (grpc/grpc#43055; why: hub_service/__init__.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from trainer_service import sdk
from trainer_service.sdk import *  # noqa: F403  # the SDK's public names, listed once there

__version__ = importlib.metadata.version("kernelhub")  # pyproject.toml is the one source

__all__ = [*sdk.__all__, "__version__"]

"""The kernelhub trainer package: the SDK a user imports (`trainer_service.sdk`,
whose public names are re-exported here) and the simulated trainers built on it
(`trainer_service.simulation`, imported only by what runs them)."""

import importlib.metadata

from trainer_service.sdk import (
    DEFAULT_TARGET,
    AlreadyExists,
    ClientClosed,
    ConnectionLost,
    DeadlineExceeded,
    FailedPrecondition,
    HubClient,
    HubError,
    Inbound,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Superseded,
    Unauthenticated,
    Unavailable,
)

__version__ = importlib.metadata.version("kernelhub")  # pyproject.toml is the one source

__all__ = [
    "DEFAULT_TARGET",
    "AlreadyExists",
    "ClientClosed",
    "ConnectionLost",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HubClient",
    "HubError",
    "Inbound",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Superseded",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]

"""The kernelhub trainer package: the SDK a user imports (`trainer_service.sdk`,
whose public names are re-exported here) and the simulated trainers built on it
(`trainer_service.simulation`, imported only by what runs them)."""

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

__version__ = "1.0.0"

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

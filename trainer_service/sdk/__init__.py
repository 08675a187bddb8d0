"""The SDK a trainer imports: `HubClient` and the typed errors it raises.

Kept apart from the simulation (`trainer_service.simulation`) so a user's own
agent pulls in only the client; it imports neither the simulation nor the hub
(an import-linter contract in pyproject.toml checks it).
"""

from trainer_service.sdk.client import DEFAULT_TARGET, HubClient, Inbound
from trainer_service.sdk.errors import (
    AlreadyExists,
    ClientClosed,
    ConnectionLost,
    DeadlineExceeded,
    FailedPrecondition,
    HubError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Superseded,
    Unauthenticated,
    Unavailable,
)

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
]

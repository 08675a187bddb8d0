"""The SDK a trainer imports: `HubClient` and the typed errors it raises.

Kept apart from the simulation (`trainer_service.simulation`) so a user's own
agent pulls in only the client; it imports neither the simulation nor the hub
(an import-linter contract in pyproject.toml checks it).
"""

from trainer_service.sdk.client import DEFAULT_TARGET, HistoryGap, HubClient, Inbound
from trainer_service.sdk.errors import (
    AlreadyExists,
    ClientClosed,
    ConnectionLost,
    DeadlineExceeded,
    FailedPrecondition,
    HubError,
    InvalidArgument,
    NotFound,
    OutOfRange,
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
    "HistoryGap",
    "HubClient",
    "HubError",
    "Inbound",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Superseded",
    "Unauthenticated",
    "Unavailable",
]

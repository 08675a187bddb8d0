"""The one exception type the hub's domain code raises, and its two wire forms:
an in-stream `RequestError` and a rich `google.rpc.Status` for unary RPCs."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from generated.kernelhub.v1 import hub_pb2 as pb

# In UTF-8 bytes: grpc percent-encodes the message (up to 3x) and base64s the details,
# and all of it must fit the 16 KiB trailer limit.
MAX_MESSAGE = 512
MAX_DETAIL = 120
MAX_VIOLATIONS = 10


def _clip(text: str, limit: int) -> str:
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode(errors="ignore") + "…"


class StatusError(Exception):
    """What the hub answers instead of a result: a gRPC status code, the sentence that says
    why, and the bad fields. (The SDK's `HubError` is the client's side of the same answer.)"""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        # Bounded: error text travels in gRPC trailers (16 KiB at most) and may quote input.
        message = _clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = [
            (_clip(field, MAX_DETAIL), _clip(why, MAX_DETAIL))
            for field, why in violations[:MAX_VIOLATIONS]
        ]

    def __reduce__(
        self,
    ) -> tuple[type[StatusError], tuple[grpc.StatusCode, str, list[tuple[str, str]]]]:
        # Errors cross the pipe from the writer process; Exception's default would lose the code.
        return (type(self), (self.code, self.message, self.violations))

    def to_request_error(self, message_id: str) -> pb.RequestError:
        return pb.RequestError(
            message_id=message_id,
            code=self.code.value[0],
            code_name=self.code.name,
            message=self.message,
            field_violations=[
                pb.FieldViolation(field=f, description=d) for f, d in self.violations
            ],
        )

    def to_status(self) -> grpc.Status:
        """A status carrying `BadRequest` details, which grpcurl and other clients print."""
        details = []
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        status = status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=details
        )
        return rpc_status.to_status(status)


def invalid(violations: Sequence[tuple[str, str]]) -> StatusError:
    """INVALID_ARGUMENT whose message lists every bad field."""
    shown = "; ".join(f"{field}: {why}" for field, why in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return StatusError(
        grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {shown}{more}", violations
    )


def not_found(what: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, f"{what} not found")


def failed_precondition(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.FAILED_PRECONDITION, message)


def permission_denied(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.PERMISSION_DENIED, message)


def unavailable(message: str) -> StatusError:
    return StatusError(grpc.StatusCode.UNAVAILABLE, message)

"""Typed errors for everything the hub can refuse, so callers catch a class
instead of comparing status codes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import grpc
import grpc.aio

from generated.kernelhub.v1 import hub_pb2 as pb

# The trailer in which a server may put a serialized google.rpc.Status with
# details (BadRequest field violations) next to the plain status.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class HubError(Exception):
    """A refusal or failure reported by (or on the way to) the hub."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        message_id: str = "",
        field_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.message_id = message_id
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        details = "; ".join(f"{f}: {d}" for f, d in self.field_violations)
        if details and details not in self.message:
            text += f" ({details})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, message={self.message!r}, "
            f"message_id={self.message_id!r}, field_violations={self.field_violations!r})"
        )


class InvalidArgument(HubError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HubError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(HubError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(HubError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(HubError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(HubError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(HubError):
    """Transient: the same message_id may be sent again."""

    default_code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(HubError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(HubError):
    """No answer within the caller's deadline; the hub may still have stored it."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class ConnectionLost(HubError):
    """Reconnecting failed for longer than the client's reconnect_timeout.

    Not an `Unavailable`: retrying the same call will not help, the session is over.
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class Superseded(HubError):
    """A newer Connect for the same agent took the session over (ABORTED)."""

    default_code = grpc.StatusCode.ABORTED


class ClientClosed(HubError):
    """The client was closed while the call was still waiting for the hub."""

    default_code = grpc.StatusCode.CANCELLED


class OutOfRange(HubError):
    """A resume after a seq the hub no longer holds the events after (retention pruned
    them): `oldest_seq` is the oldest it still holds (0 if the hub did not say).
    `HubClient` answers it itself, by starting afresh from now (`HubClient.history_gap`)."""

    default_code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(
        self,
        message: str,
        *,
        oldest_seq: int = 0,
        code: grpc.StatusCode | None = None,
        message_id: str = "",
        field_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(
            message, code=code, message_id=message_id, field_violations=field_violations
        )
        self.oldest_seq = oldest_seq


# The trailer of an OUT_OF_RANGE Hello refusal that names the oldest seq still held.
_OLDEST_SEQ_KEY = "kernelhub-oldest-seq"

_BY_CODE: dict[grpc.StatusCode, type[HubError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}

# grpc.StatusCode values are (number, name) tuples; RequestError carries the number.
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {int(c.value[0]): c for c in grpc.StatusCode}


def status_code_from_number(number: int) -> grpc.StatusCode:
    """Unknown numbers map to UNKNOWN rather than failing: a newer hub may use more."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def make_error(
    code: grpc.StatusCode,
    message: str,
    *,
    message_id: str = "",
    field_violations: Iterable[tuple[str, str]] = (),
) -> HubError:
    """The most specific HubError subclass for `code`."""
    cls = _BY_CODE.get(code, HubError)
    return cls(message, code=code, message_id=message_id, field_violations=field_violations)


def error_from_request_error(error: pb.RequestError) -> HubError:
    """Turns a per-message refusal from the Connect stream into an exception."""
    return make_error(
        status_code_from_number(error.code),
        error.message or error.code_name or "request refused",
        message_id=error.message_id,
        field_violations=[(v.field, v.description) for v in error.field_violations],
    )


def error_from_rpc(error: grpc.aio.AioRpcError) -> HubError:
    """Turns a failed RPC into an exception; ABORTED becomes `Superseded` because
    that is the only thing the hub uses it for."""
    code = error.code()
    message = error.details() or code.name
    violations = _field_violations(error)
    if code == grpc.StatusCode.ABORTED:
        return Superseded(message, field_violations=violations)
    if code == grpc.StatusCode.OUT_OF_RANGE:
        return OutOfRange(message, oldest_seq=_oldest_seq(error))
    return make_error(code, message, field_violations=violations)


def _oldest_seq(error: grpc.aio.AioRpcError) -> int:
    try:
        return int(dict(error.trailing_metadata() or ()).get(_OLDEST_SEQ_KEY, 0))
    except (TypeError, ValueError, AttributeError):
        return 0


def _field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """Best effort: BadRequest details from the rich-status trailer, if the hub sent one."""
    try:
        raw: object = (error.trailing_metadata() or {}).get(_STATUS_DETAILS_KEY)
    except (TypeError, ValueError, AttributeError):
        return []
    if not isinstance(raw, bytes):
        return []
    try:
        from google.rpc import (  # type: ignore[import-untyped,unused-ignore]
            error_details_pb2,
            status_pb2,
        )

        status = status_pb2.Status.FromString(raw)
        violations: list[tuple[str, str]] = []
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations.extend(
                    (str(v.field), str(v.description)) for v in bad_request.field_violations
                )
        return violations
    except Exception:  # a malformed trailer must not hide the real error
        return []

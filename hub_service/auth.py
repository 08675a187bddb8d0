"""Bearer-token authentication, checked by a server interceptor before any handler runs."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError

from . import wire
from .errors import StatusError
from .ratelimit import ThrottledLog
from .roles import Role, may_call, refusal
from .state import Principal
from .tokens import hash_token

# grpc.RpcMethodHandler; grpcio ships no type hints, so grpc types are Any to mypy.
Handler: TypeAlias = Any

# (agent, role, token hash)
_identity: ContextVar[tuple[str, Role, str]] = ContextVar("kernelhub_identity")

# Health checks and reflection are for operators and load balancers: no token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Undecodable requests are logged in one line at most every this many seconds, with a count,
# so a flood of garbage cannot grow the log without bound.
UNDECODABLE_REPORT_INTERVAL = 10.0

log = logging.getLogger(__name__)


def current_agent() -> str:
    """The agent whose token authenticated the RPC being handled."""
    return _identity.get()[0]


def current_role() -> Role:
    """That token's role (the interceptor has already checked it may call the RPC)."""
    return _identity.get()[1]


def current_token_hash() -> str:
    """The hash of that token, to re-check it while the stream lives."""
    return _identity.get()[2]


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _same_kind(handler: Handler, behavior: Any, request_deserializer: Any) -> Handler:
    """A handler of the same kind as `handler` (unary or streaming each way) running `behavior`.

    The kind must match: a unary abort handler answering a streaming method
    leaves the client hanging.
    """
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        behavior,
        request_deserializer=request_deserializer,
        # A handler may write a response it serialized itself (what many streams share).
        response_serializer=wire.passthrough(handler.response_serializer),
    )


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler that only aborts, and never decodes the request: a caller without a valid
    token gets its refusal whatever bytes it sent."""

    async def abort(_request: Any, context: Any) -> None:
        await context.abort(code, message)

    return _same_kind(handler, abort, None)  # None: grpc hands over the bytes undecoded


def _message_name(deserialize: Any) -> str:
    """`kernelhub.v1.GetHubStatsRequest` for a generated `FromString`."""
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


class _Decoding:
    """Wraps every handler so that a request that does not decode is answered
    INVALID_ARGUMENT naming its message type, and logged (rate-limited) in one line.

    Left to grpc, a unary request is decoded before any handler runs, and a failure
    answers UNKNOWN and logs a traceback per request; a streaming handler that lets a
    DecodeError escape does the same. So unary requests reach the wrapper undecoded and
    are decoded there; for streaming requests (decoded as the handler reads them) a
    DecodeError that escapes the handler is answered here.
    """

    def __init__(self) -> None:
        self._reports = ThrottledLog(log, UNDECODABLE_REPORT_INTERVAL)

    async def _refuse(self, method: str, message: str, context: Any) -> NoReturn:
        self._reports.warning(
            "refused %d undecodable request(s) since the last such line; the latest: %s from %s",
            method,
            context.peer(),
        )
        error = StatusError(grpc.StatusCode.INVALID_ARGUMENT, message)  # clipped to fit a trailer
        await context.abort(error.code, error.message)
        raise AssertionError("context.abort returns only by raising")  # pragma: no cover

    def wrap(self, handler: Handler, method: str) -> Handler:
        behavior = (
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream
        )
        deserialize = handler.request_deserializer
        if deserialize is None or not (
            inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
        ):
            return handler  # nothing to decode, or not an aio handler
        name = _message_name(deserialize)
        streaming = handler.request_streaming

        async def decoded(request: Any, context: Any) -> Any:
            if streaming:
                return request  # grpc decodes each message as the handler reads it
            try:
                return deserialize(request)
            except Exception as exc:  # whatever a deserializer raises, the bytes are bad
                await self._refuse(method, f"the request is not a valid {name} ({exc})", context)

        async def refuse_escaped(error: DecodeError, context: Any) -> NoReturn:
            if not streaming:  # the request decoded: this is not about its bytes
                raise error
            await self._refuse(
                method, f"a request message is not a valid {name} ({error})", context
            )

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                request = await decoded(request, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                except DecodeError as error:
                    await refuse_escaped(error, context)

            wrapped: Any = stream
        else:

            async def call(request: Any, context: Any) -> Any:
                request = await decoded(request, context)
                try:
                    return await behavior(request, context)
                except DecodeError as error:
                    await refuse_escaped(error, context)

            wrapped = call
        # Unary requests reach the wrapper as bytes (no deserializer) and are decoded here.
        return _same_kind(handler, wrapped, deserialize if streaming else None)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Rejects RPCs without a valid `authorization: Bearer <token>` with UNAUTHENTICATED, and
    those the token's role may not call with PERMISSION_DENIED."""

    def __init__(
        self,
        authenticate: Callable[[str], Awaitable[Principal | None]],
        on_refusal: Callable[[str, grpc.StatusCode], None] = lambda _method, _code: None,
    ) -> None:
        self._authenticate = authenticate
        self._on_refusal = on_refusal  # counted (kernelhub_rpc_errors_total)
        self._decoding = _Decoding()

    def _refuse(
        self, handler: Handler, method: str, code: grpc.StatusCode, message: str
    ) -> Handler:
        self._on_refusal(method, code)
        return _refusal(handler, code, message)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return None
        if method.startswith(OPEN_METHOD_PREFIXES):
            return self._decoding.wrap(handler, method)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return self._refuse(
                handler,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        try:
            principal = await self._authenticate(token)
        except StatusError as error:  # the token store is unreachable
            return self._refuse(handler, method, error.code, error.message)
        if principal is None:
            return self._refuse(
                handler,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid, expired or revoked token",
            )
        if not may_call(principal.role, method):
            return self._refuse(
                handler, method, grpc.StatusCode.PERMISSION_DENIED, refusal(principal.role, method)
            )
        # The interceptor and the handler share one contextvars.Context (grpc.aio docs).
        _identity.set((principal.agent_id, principal.role, hash_token(token)))
        return self._decoding.wrap(handler, method)

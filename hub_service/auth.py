"""Bearer-token authentication, checked by a server interceptor before any handler runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeAlias

import grpc

from .errors import HubError
from .tokens import hash_token

# grpc.RpcMethodHandler; grpcio ships no type hints, so grpc types are Any to mypy.
Handler: TypeAlias = Any

_identity: ContextVar[tuple[str, str]] = ContextVar("kernelhub_identity")  # (agent, token hash)

# Health checks and reflection are for operators and load balancers: no token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def current_agent() -> str:
    """The agent whose token authenticated the RPC being handled."""
    return _identity.get()[0]


def current_token_hash() -> str:
    """The hash of that token, to re-check it while the stream lives."""
    return _identity.get()[1]


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _refusal(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same kind as `handler` that only aborts.

    The kind must match: a unary abort handler answering a streaming method
    leaves the client hanging.
    """

    async def abort(_request: Any, context: Any) -> None:
        await context.abort(code, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped base
    """Rejects RPCs without a valid `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, authenticate: Callable[[str], Awaitable[str | None]]) -> None:
        self._authenticate = authenticate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            return _refusal(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            )
        try:
            agent_id = await self._authenticate(token)
        except HubError as error:  # the token store is unreachable
            return _refusal(handler, error.code, error.message)
        if agent_id is None:
            return _refusal(
                handler, grpc.StatusCode.UNAUTHENTICATED, "invalid, expired or revoked token"
            )
        # The interceptor and the handler share one contextvars.Context (grpc.aio docs).
        _identity.set((agent_id, hash_token(token)))
        return handler

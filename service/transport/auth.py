"""Bearer-token authentication: a grpc.aio server interceptor that refuses calls without the token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

# Health stays open: load balancers and Kubernetes probes carry no credentials, and the health
# status reveals nothing. Everything else (the TokenWire RPCs, Cancel included, and reflection)
# needs the token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call except those under `open_prefixes`.

    The scheme name is case-insensitive (RFC 7235 section 2.1: "bearer" and "BEARER" are "Bearer"); the
    token is compared exactly, in constant time."""

    def __init__(self, token: str, open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self._expected = token.encode()
        self._open_prefixes = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._open_prefixes) or self._allowed(handler_call_details):
            return handler
        return _refusing(handler)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                scheme, _, credentials = given.partition(b" ")
                # The scheme is public and compared plainly; then constant time: the comparison must not
                # leak how much of the token matched. Spaces after the scheme are 1*SP in RFC 7235.
                is_bearer = scheme.lower() == b"bearer"
                return hmac.compare_digest(credentials.lstrip(b" "), self._expected) and is_bearer
        return False


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED without reading anything."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **serializers)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **serializers)
    return grpc.unary_unary_rpc_method_handler(refuse, **serializers)

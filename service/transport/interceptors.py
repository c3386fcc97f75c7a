"""The catch-all: an exception that escapes an RPC handler becomes INTERNAL, and one ERROR log line.

Without it grpc answers UNKNOWN with the exception's type and text as the status details, which can
tell a client about the server's insides. Here the client reads a short message naming the request,
and the log gets the traceback. A deliberate `context.abort` (grpc.aio.AbortError) and cancellation
pass through unchanged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tokenwire.service.engine.wording import MAX_SHOWN_ID_CHARS, shown_id

log = logging.getLogger("tokenwire.internal")


class RequestFailed(Exception):
    """An unexpected error while serving one request of a stream, with that request's id; raised by a
    handler with the error itself as `__cause__`, so the catch-all can name the request."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {shown_id(request_id)} failed" if request_id else "a request failed")
        self.request_id = request_id


# A request id longer than the contract allows is not repeated (it came from the client, unchecked).
MAX_ECHOED_ID_CHARS = 128


def internal_message(request_id: str) -> str:
    """What a client is told: nothing about the error, only which request and where to look."""
    if request_id and len(request_id) <= MAX_ECHOED_ID_CHARS:
        return f"internal error (request {request_id}); see the server log"
    return "internal error; see the server log"


class CatchAllInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every async handler so that an unexpected exception ends the RPC with INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        return _guarded(handler, handler_call_details.method or "")


def _guarded(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler`, its behaviour wrapped by the catch-all. A single
    request is decoded inside the wrapper (grpc would answer UNKNOWN with the parser's exception for
    bytes that are not the message): undecodable bytes get INVALID_ARGUMENT. A request stream's
    messages are decoded as they are read, where the handler sees the error (Generate answers it)."""
    decode = handler.request_deserializer
    streamed = {"request_deserializer": decode, "response_serializer": handler.response_serializer}
    single = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_wrap(handler.stream_stream, method), **streamed)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_wrap(handler.stream_unary, method), **streamed)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_wrap(handler.unary_stream, method, decode), **single)
    return grpc.unary_unary_rpc_method_handler(_wrap(handler.unary_unary, method, decode), **single)


def _wrap(
    behaviour: Callable[..., Any], method: str, decode: Callable[[bytes], Any] | None = None
) -> Callable[..., Any]:
    """The same kind of callable as `behaviour` (grpc.aio tells them apart by kind): an async
    generator function for one that yields responses, a coroutine function for one that returns a
    response or writes its responses with `context.write`. Anything else (a sync handler) is left be.
    `decode`: the request's deserializer, for a single request passed in as bytes."""
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await _decoded(request, decode, context, method)
            try:
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _answer_internal(error, request, context, method)

        return streaming

    if inspect.iscoroutinefunction(behaviour):

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request = await _decoded(request, decode, context, method)
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _answer_internal(error, request, context, method)

        return unary

    if decode is not None:  # a sync handler: grpc must decode for it
        raise TypeError(f"{method}: the catch-all wraps async handlers only")
    return behaviour


async def _decoded(
    request: Any, decode: Callable[[bytes], Any] | None, context: grpc.aio.ServicerContext, method: str
) -> Any:
    if decode is None:
        return request
    try:
        return decode(request)
    except DecodeError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {method} request")


async def _answer_internal(
    error: Exception, request: Any, context: grpc.aio.ServicerContext, method: str
) -> None:
    """Log `error` once and end the RPC with INTERNAL (re-raises it when the handler chose a status,
    or when the RPC is already over: grpc's own errors for a client that left are not bugs)."""
    if _status_chosen(context) or context.cancelled() or context.done():
        raise error
    request_id = error.request_id if isinstance(error, RequestFailed) else _request_id(request)
    log.error(
        "internal error in %s request_id=%s",
        method,
        shown_id(request_id) if request_id else "-",
        exc_info=error,
        extra={"method": method, "request_id": request_id[:MAX_SHOWN_ID_CHARS]},
    )
    await context.abort(grpc.StatusCode.INTERNAL, internal_message(request_id))


def _status_chosen(context: grpc.aio.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code not in (0, grpc.StatusCode.OK)


def _request_id(request: Any) -> str:
    """The request id a unary request names (Cancel's), if it names one; "" for a request stream."""
    request_id = getattr(request, "request_id", "")
    return request_id if isinstance(request_id, str) else ""

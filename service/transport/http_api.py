"""The OpenAI-compatible HTTP API, a Starlette app over the engine gRPC serves: GET /v1/models,
POST /v1/chat/completions and /v1/completions (whole, or streamed as server-sent events), GET /health.

Requests are the gRPC side's in another dress: the same checks (openai_convert), the same engine (so
HTTP and gRPC requests batch together), the same bearer tokens naming the principal that owns them.
A client that hangs up, streaming or not, aborts its request at the engine's next step."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenwire.service.engine.engine import Engine
from tokenwire.service.engine.requests import (
    Delta,
    ErrorCode,
    Failure,
    Finished,
    GenerationRequest,
    RequestError,
    StopReason,
    TokenLogprob,
)
from tokenwire.service.engine.streams import RequestStream
from tokenwire.service.transport.auth import ANONYMOUS, Authenticator, Principal
from tokenwire.service.transport.openai_convert import (
    CHAT,
    Answer,
    ApiCall,
    ApiError,
    chat_call,
    completion_call,
)
from tokenwire.v1.metadata import REPLICA_HEADER

log = logging.getLogger("tokenwire.http")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # like gRPC's message limit: the server passes its own
# Proxies (nginx) buffer responses unless told not to: tokens must leave as they come.
EVENT_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
DONE = b"data: [DONE]\n\n"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_response(error: ApiError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first(work: Awaitable[Any], receive: Receive) -> tuple[bool, Any]:
    """Run `work` until it ends or the client hangs up, whichever comes first: (finished, result)."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            task.cancel()
        await asyncio.gather(working, watching, return_exceptions=True)
    if working.cancelled():
        return False, None
    return True, working.result()


def _naming_replica(app: ASGIApp, replica_id: str) -> ASGIApp:
    """`app` with the replica header on every response."""
    header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def named(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, sending)

    return named


class EventStream(Response):
    """A text/event-stream response that stops sending when the client hangs up (whatever the ASGI
    server's spec version) and calls `on_close` however it ends: sent, cut off, or cancelled."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(EVENT_STREAM_HEADERS)

    async def _send_all(self, send: Send) -> None:
        async for event in self.events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            await _first(self._send_all(send), receive)
        finally:
            self.on_close()


async def _collect(stream: RequestStream) -> tuple[str, list[TokenLogprob], Finished | Failure]:
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    async for output in stream:
        if isinstance(output, Delta):
            texts.append(output.text)
            logprobs.extend(output.logprobs)
        elif isinstance(output, Finished | Failure):
            return "".join(texts), logprobs, output
    raise RuntimeError("a request stream ended without Finished or Failure")


class HttpApi:
    """The routes, over whichever engine `engine()` gives (None while the model loads: 503)."""

    def __init__(
        self,
        engine: Callable[[], Engine | None],
        authenticator: Authenticator,
        *,
        serving: Callable[[], bool],
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_refused: Callable[[ErrorCode], None] | None = None,
        replica_id: str = "",
    ) -> None:
        if authenticator.tokens is None and authenticator.certificates:
            raise ValueError(
                "the HTTP API names its callers by bearer token: under mutual TLS (--tls-client-ca) it "
                "needs --auth-token or --auth-tokens-file"
            )
        self._engine = engine
        self.authenticator = authenticator
        self.serving = serving  # what /health answers: the gRPC health status of the server
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused
        self.replica_id = replica_id
        self.created = int(time.time())
        # (owner, request id) -> stream of the requests this API started and has not answered yet
        self.live: dict[tuple[str, str], RequestStream] = {}
        starlette = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
            ],
            exception_handlers={HTTPException: _routing_error},  # type: ignore[dict-item]
        )
        # Behind a proxy, as on gRPC: every answer names its replica (x-tokenwire-replica), so a gRPC
        # Cancel of an HTTP request's id can be routed to the replica that holds it.
        self.app: ASGIApp = _naming_replica(starlette, replica_id) if replica_id else starlette

    # ---- routes ----

    async def health(self, request: Request) -> Response:
        """Open, like grpc.health.v1: 200 while the server is SERVING, 503 otherwise."""
        serving = self.serving()
        status = "SERVING" if serving else "NOT_SERVING"
        return JSONResponse({"status": status}, status_code=200 if serving else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._principal(request)
            info = self._engine_or_error().model_info()
        except ApiError as error:
            return error_response(error)
        model = {
            "id": info.name,
            "object": "model",
            "created": self.created,
            "owned_by": "tokenwire",
            "max_model_len": info.context_length,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(request, chat_call)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, completion_call)

    # ---- a generation ----

    async def _guarded(self, request: Request, parse: Callable[[object], ApiCall]) -> Response:
        try:
            return await self._generate(request, parse)
        except ApiError as error:
            self._log_refusal(request, error)
            if self.on_refused is not None and error.reason is not None:
                self.on_refused(error.reason)
            return error_response(error)
        except Exception:  # a bug: the caller gets OpenAI's error object, the log the traceback
            log.exception("HTTP %s failed", request.url.path)
            return error_response(
                ApiError("internal error", status=500, type="server_error", code="internal")
            )

    async def _generate(self, request: Request, parse: Callable[[object], ApiCall]) -> Response:
        principal = self._principal(request)
        engine = self._engine_or_error()
        call = parse(await self._body(request))
        generation = call.request
        generation.owner = principal.name
        # OpenAI's id shapes. The id is live in the principal's namespace: gRPC Cancel reaches it too.
        replica = f"{self.replica_id}." if self.replica_id else ""  # as gRPC's server-assigned ids
        generation.request_id = f"{'chatcmpl' if call.kind == CHAT else 'cmpl'}-{replica}{uuid.uuid4().hex}"
        try:
            stream = await engine.submit(generation)
        except RequestError as error:
            raise ApiError.from_request_error(error, call.params) from None
        self.live[generation.key] = stream
        answer = Answer(call, engine.model_info().name)

        def close() -> None:
            self._close(engine, generation, stream)

        if call.stream:
            return EventStream(self._events(answer, stream, call), close)
        try:
            finished, result = await _first(_collect(stream), request.receive)
        finally:
            close()
        if not finished:  # the client hung up: nobody reads this
            return Response(status_code=400)
        text, logprobs, end = result
        if isinstance(end, Failure):
            return error_response(ApiError.from_request_error(end, call.params))
        return JSONResponse(answer.whole(text, logprobs, end))

    async def _events(self, answer: Answer, stream: RequestStream, call: ApiCall) -> AsyncIterator[bytes]:
        first = answer.first_chunk()
        if first is not None:
            yield _sse(first)
        try:
            async for output in stream:
                if isinstance(output, Delta):
                    chunk = answer.delta_chunk(output)
                    if chunk is not None:
                        yield _sse(chunk)
                elif isinstance(output, Finished):
                    for chunk in answer.last_chunks(output):
                        yield _sse(chunk)
                elif isinstance(output, Failure):
                    yield _sse(ApiError.from_request_error(output, call.params).body())
        except Exception:  # a bug, after the 200 went out: the stream says so in OpenAI's words
            log.exception("HTTP stream of %s failed", call.request.request_id)
            yield _sse(ApiError("internal error", status=500, type="server_error", code="internal").body())
        yield DONE

    def _close(self, engine: Engine, generation: GenerationRequest, stream: RequestStream) -> None:
        """The response is over (sent, or its client gone): free the request if it still runs."""
        key = generation.key
        if self.live.get(key) is stream:
            del self.live[key]
        # Only if the id still names this request: after it ended, the owner may have reused it.
        if not stream.done and engine.stream_of(generation.request_id, generation.owner) is stream:
            engine.abort(generation.request_id, StopReason.CANCELLED, owner=generation.owner)

    def stop_now(self) -> None:
        """Server stop without a grace period: every live HTTP request ends at the next step (its
        stream with finish_reason "abort", a whole answer with what was generated)."""
        engine = self._engine()
        if engine is None:
            return
        for (owner, request_id), stream in list(self.live.items()):
            if engine.stream_of(request_id, owner) is stream:
                engine.abort(request_id, StopReason.SHUTDOWN, owner=owner)

    # ---- the caller and the body ----

    def _principal(self, request: Request) -> Principal:
        authenticator = self.authenticator
        if authenticator.tokens is None:
            return ANONYMOUS
        header = request.headers.get("authorization")
        name = authenticator.name_in([("authorization", header)] if header is not None else [])
        if name is None:
            raise ApiError(
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                status=401,
                code="invalid_api_key",
            )
        return Principal(name, operator=name in authenticator.operators)

    def _engine_or_error(self) -> Engine:
        engine = self._engine()
        if engine is None:
            raise ApiError("the model is still loading", status=503, type="server_error", code="unavailable")
        return engine

    async def _body(self, request: Request) -> object:
        limit = self.max_body_bytes
        too_large = ApiError(f"the request body is larger than {limit:,} bytes", status=413, code=None)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as error:  # RecursionError: arrays nested too deep
            raise ApiError(f"the request body is not valid JSON: {error}", code="invalid_json") from None

    def _log_refusal(self, request: Request, error: ApiError) -> None:
        log.info(
            "HTTP %s refused status=%d param=%s: %s",
            request.url.path,
            error.status,
            error.param,
            error.message,
            extra={"status": error.status, "param": error.param},
        )


async def _routing_error(request: Request, error: HTTPException) -> Response:
    """An unknown path or method, in OpenAI's error object too."""
    return error_response(ApiError(error.detail, status=error.status_code, code=None))

"""The tokenwire.v1.TokenWire servicer: many generations per Generate stream, Cancel, model info, Tokenize."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

import tokenwire
from tokenwire.service.engine.engine import Engine, check_printable_id
from tokenwire.service.engine.requests import ErrorCode, OutputOptions, RequestError, StopReason
from tokenwire.service.engine.streams import RequestStream
from tokenwire.service.engine.wording import MAX_SHOWN_ID_CHARS, plural, shown_id
from tokenwire.service.transport import convert
from tokenwire.service.transport.auth import ANONYMOUS, Authenticator, Principal
from tokenwire.service.transport.convert import MessageError
from tokenwire.service.transport.interceptors import RequestFailed
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc
from tokenwire.v1.metadata import REPLICA_HEADER

log = logging.getLogger("tokenwire.servicer")

# Responses queued per stream before the per-request forwarders wait. While they wait, the engine
# merges the piling-up deltas of each request into fewer, larger chunks, so memory stays bounded.
OUTGOING_BOUND = 64
# gRPC's own default limit on a message's size, for a servicer not told the server's.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Open Generate streams one principal may have. Each costs ~27 KiB idle; a stream carries any number
# of generations, so a caller needs many only to serve many independent conversations at once.
DEFAULT_MAX_STREAMS_PER_PRINCIPAL = 512
# A Generate stream that has sent nothing this long sends a Heartbeat: well under the idle timeouts of
# common proxies (nginx's grpc_read_timeout and AWS ALB's 60 s, Google's load balancers' 30 s), at a
# cost of a few bytes per quiet stream per interval.
DEFAULT_HEARTBEAT_S = 15.0
_HEARTBEAT = pb.GenerateResponse(heartbeat=pb.Heartbeat())


class _GenerateCall:
    """One Generate RPC: a reader task for the request side, a forwarder task per request started on
    this stream, and the one outgoing queue they all feed.

    The RPC ends when nothing can produce more: the reader has stopped (half-close, or the server
    draining) and every request has delivered its last message."""

    def __init__(
        self,
        engine: Engine,
        on_refused: Callable[[ErrorCode], None] | None,
        replica_id: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        principal: Principal = ANONYMOUS,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.engine = engine
        self.principal = principal  # the caller: its requests are named in its own namespace
        self.owner = principal.name
        self.messages_read = 0  # request messages read so far: a refusal names its message by position
        self.on_refused = on_refused
        self.replica_id = replica_id
        # No response may be larger: gRPC would fail the whole stream, every request on it included.
        self.max_message_bytes = max_message_bytes
        self.out: asyncio.Queue[pb.GenerateResponse | None] = asyncio.Queue(OUTGOING_BOUND)
        # request id -> (forwarder, engine stream): the requests this stream may interrupt or abandon.
        self.owned: dict[str, tuple[asyncio.Task[None], RequestStream]] = {}
        self.producers = 0  # the reader, plus one per forwarder
        self.reader: asyncio.Task[None] | None = None
        self.cut_by_server = False
        self.unreadable: DecodeError | None = None  # a request that could not be parsed ends the RPC
        # So does a bug met while handling a message (INTERNAL): the request id it named, and the error.
        self.failed: tuple[str, Exception] | None = None
        self.heartbeat_s = heartbeat_s  # 0: no heartbeats
        self.heartbeat: asyncio.Task[None] | None = None
        self.last_sent = 0.0  # loop time of the last response handed to gRPC

    # ---- lifecycle ----

    def begin(self, requests: AsyncIterable[pb.GenerateRequest]) -> None:
        self.producers += 1
        self.reader = asyncio.create_task(self._read(requests), name="tokenwire-generate-reader")
        self.last_sent = asyncio.get_running_loop().time()
        if self.heartbeat_s > 0:
            self.heartbeat = asyncio.create_task(self._beat(), name="tokenwire-generate-heartbeat")

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        loop = asyncio.get_running_loop()
        while True:
            if self.producers == 0 and self.out.empty():
                return
            item = await self.out.get()
            if item is not None:  # None only wakes us up to re-check the end condition
                self.last_sent = loop.time()
                yield item

    async def _beat(self) -> None:
        """Queue a Heartbeat whenever the stream has sent nothing for heartbeat_s: a proxy in between
        (nginx's grpc_read_timeout) would otherwise cut a stream whose requests are quiet."""
        loop = asyncio.get_running_loop()
        while True:
            wait = self.last_sent + self.heartbeat_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.out.empty():  # else something is about to go out anyway (or the client is not reading)
                self.out.put_nowait(_HEARTBEAT)
            self.last_sent = loop.time()

    def _producer_done(self) -> None:
        self.producers -= 1
        if self.producers == 0 and self.out.empty():
            self.out.put_nowait(None)  # cannot be full: it is empty

    def close(self) -> None:
        """Server drain: stop reading new requests; running ones still deliver their last message."""
        if self.reader is not None and not self.reader.done():
            self.cut_by_server = True
            self.reader.cancel()

    def stop_now(self, error: RequestError) -> None:
        """Server stop without a grace period: stop reading, and send each live request `error` in place
        of the rest of its output. A request whose Finished is already on its way keeps it."""
        self.close()
        for request_id, (task, stream) in list(self.owned.items()):
            if stream.done:
                continue
            if self.engine.stream_of(request_id, self.owner) is stream:
                self.engine.abort(request_id, StopReason.SHUTDOWN, owner=self.owner)
            task.cancel()
            self.producers += 1
            response = convert.error_response(request_id, error)
            self.owned[request_id] = (asyncio.create_task(self._send_last(request_id, response)), stream)

    def abandon(self) -> None:
        """The RPC is over (client gone, deadline, or done): free every request still live. Idempotent."""
        if self.reader is not None:
            self.reader.cancel()
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        for request_id, (task, stream) in list(self.owned.items()):
            # Only if the id still names this stream's request: after it ended, another stream may reuse it.
            if self.engine.stream_of(request_id, self.owner) is stream:
                self.engine.abort(request_id, StopReason.CANCELLED, owner=self.owner)
            task.cancel()
        self.owned.clear()

    # ---- the request side ----

    async def _read(self, requests: AsyncIterable[pb.GenerateRequest]) -> None:
        try:
            async for message in requests:
                try:
                    await self._handle(message)
                except Exception as error:  # a bug, not the client's doing: the RPC ends with INTERNAL
                    self.failed = (_request_id_of(message), error)
                    self.abandon()
                    return
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the request side broke (e.g. a message over the size limit)
            log.info("Generate request stream failed: %r", error)
            if isinstance(error, DecodeError):
                self.unreadable = error
            self.abandon()
        finally:
            self._producer_done()

    async def _handle(self, message: pb.GenerateRequest) -> None:
        index = self.messages_read
        self.messages_read += 1
        kind = message.WhichOneof("kind")
        if kind == "start":
            await self._start(message.start, index)
        elif kind == "interrupt":
            await self._interrupt(message.interrupt, index)
        elif kind == "heartbeat":
            return  # the client keeps a proxy from cutting its quiet request side: nothing to do
        else:
            neither = MessageError(
                ErrorCode.INVALID_ARGUMENT, "kind: set start, interrupt or heartbeat", "kind"
            )
            await self.out.put(convert.refusal_response("", neither, pb.Error.REFUSAL_MESSAGE, index))

    async def _refuse(self, request_id: str, error: RequestError, index: int) -> None:
        if self.on_refused is not None:
            self.on_refused(error.code)
        field = convert.error_path(error)
        # The id is the client's, unchecked (it may be what is refused): escaped and cut in the line;
        # JSON escapes it in the record's own field, cut to the length the contract allows.
        log.info(
            "request refused request_id=%s principal=%s code=%s field=%s: %s",
            shown_id(request_id),
            self.principal.shown,
            error.code.name,
            field,
            convert.bare_message(error),
            extra={
                "request_id": request_id[:MAX_SHOWN_ID_CHARS],
                "principal": self.principal.shown,
                "code": error.code.name,
                "field": field,
            },
        )
        await self.out.put(convert.refusal_response(request_id, error, pb.Error.REFUSAL_START, index))

    async def _start(self, start: pb.Start, index: int) -> None:
        try:
            request = convert.start_to_request(start)
            request.owner = self.owner
            if not request.request_id and self.replica_id:
                # The id names its replica, so a proxy can route a later Cancel to it.
                request.request_id = f"{self.replica_id}.{uuid.uuid4().hex}"
            stream = await self.engine.submit(request)
        except RequestError as error:
            await self._refuse(start.request_id, error, index)
            return
        except Exception:
            log.exception("could not start request %s", shown_id(start.request_id))
            await self._refuse(start.request_id, RequestError(ErrorCode.INTERNAL, "internal error"), index)
            return
        request_id = request.request_id  # assigned by the engine when the client left it empty
        self.producers += 1
        task = asyncio.create_task(self._forward(request_id, stream, request.output))
        self.owned[request_id] = (task, stream)

    async def _interrupt(self, interrupt: pb.Interrupt, index: int) -> None:
        request_id = interrupt.request_id
        try:
            check_printable_id(request_id)
            after_segment = convert.interrupt_after_segment(interrupt)
        except RequestError as error:
            # An engine error names its field in the request: here under "interrupt.", not "start.".
            path = convert.error_path(error, root="interrupt")
            refused = MessageError(error.code, convert.describe(error, root="interrupt"), path)
            await self.out.put(
                convert.refusal_response(request_id, refused, pb.Error.REFUSAL_INTERRUPT, index)
            )
            return
        owned = self.owned.get(request_id)
        if owned is None:
            unknown = MessageError(
                ErrorCode.NOT_FOUND,
                f"interrupt.request_id: no live request {shown_id(request_id)} on this stream",
                "interrupt.request_id",
            )
            await self.out.put(
                convert.refusal_response(request_id, unknown, pb.Error.REFUSAL_INTERRUPT, index)
            )
            return
        # When the request has just ended its Finished is already on its way: that is the answer.
        if self.engine.stream_of(request_id, self.owner) is owned[1]:
            self.engine.abort(
                request_id, StopReason.INTERRUPTED, owner=self.owner, after_segment=after_segment
            )

    # ---- the response side ----

    async def _forward(self, request_id: str, stream: RequestStream, options: OutputOptions) -> None:
        try:
            async for output in stream:
                for response in convert.output_to_responses(
                    request_id, output, options, self.max_message_bytes
                ):
                    await self.out.put(response)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: as on the request side, the RPC ends with INTERNAL
            self.failed = (request_id, error)
            self.abandon()
        finally:
            self._request_done(request_id)

    async def _send_last(self, request_id: str, response: pb.GenerateResponse) -> None:
        """Send a request's last message in place of its forwarder (see `stop_now`)."""
        try:
            await self.out.put(response)
        finally:
            self._request_done(request_id)

    def _request_done(self, request_id: str) -> None:
        """A request's producer task ends: the stream no longer owns the request, unless another task
        took it over (`stop_now`)."""
        owned = self.owned.get(request_id)
        if owned is not None and owned[0] is asyncio.current_task():
            del self.owned[request_id]
        self._producer_done()


class TokenWireServicer(pb_grpc.TokenWireServicer):
    """Adapts the engine to the contract. `engine` is None while the model loads (UNAVAILABLE)."""

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        on_refused: Callable[[ErrorCode], None] | None = None,
        replica_id: str = "",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        authenticator: Authenticator | None = None,
        max_streams_per_principal: int = DEFAULT_MAX_STREAMS_PER_PRINCIPAL,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.engine = engine
        self.on_refused = on_refused
        self.replica_id = replica_id
        self.max_message_bytes = max_message_bytes  # the server's grpc.max_send_message_length
        self.authenticator = authenticator or Authenticator()
        self.max_streams_per_principal = max_streams_per_principal  # 0: no limit
        self.heartbeat_s = heartbeat_s  # a Heartbeat after this long without a response (0: never)
        self._calls: set[_GenerateCall] = set()
        self._streams_of: Counter[str] = Counter()  # open Generate streams by principal name

    async def _engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading")
        assert self.engine is not None
        return self.engine

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = self.authenticator.principal(context)
        if principal is None:  # its token was removed from the tokens file since the interceptor looked
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        assert principal is not None
        return principal

    async def Generate(
        self, request_iterator: AsyncIterable[pb.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = await self._engine(context)
        principal = await self._principal(context)
        limit = self.max_streams_per_principal
        if limit and self._streams_of[principal.name] >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"you have {plural(limit, 'open Generate stream')}, the most one caller may have at once: "
                "run several generations on one stream",
            )
        call = _GenerateCall(
            engine,
            self.on_refused,
            self.replica_id,
            self.max_message_bytes,
            principal,
            heartbeat_s=self.heartbeat_s,
        )
        if self.replica_id:
            # Which replica serves this stream: a client sends it back as a header on Cancel.
            await context.send_initial_metadata(((REPLICA_HEADER, self.replica_id),))
        self._calls.add(call)  # counted with the call, so `_end` counts it down whatever ends the RPC
        self._streams_of[principal.name] += 1
        # The generator's `finally` may run late (or not at all) when the RPC is cancelled while the
        # response is being sent; the done callback always runs, so compute is freed at once.
        context.add_done_callback(lambda _: self._end(call))
        call.begin(request_iterator)
        try:
            async for response in call.responses():
                yield response
            if call.failed is not None:
                request_id, error = call.failed
                raise RequestFailed(request_id) from error  # the catch-all interceptor answers INTERNAL
            if call.unreadable is not None:
                # Its requests were abandoned: ending with OK would tell the client they were all answered.
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"GenerateRequest: {call.unreadable}")
            if call.cut_by_server:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        finally:
            self._end(call)

    def _end(self, call: _GenerateCall) -> None:
        """The RPC is over (runs twice: from the done callback and the generator's end)."""
        call.abandon()
        if call in self._calls:
            self._calls.discard(call)
            self._streams_of[call.owner] -= 1
            if not self._streams_of[call.owner]:
                del self._streams_of[call.owner]

    async def close_streams(self, timeout: float) -> None:
        """Drain: stop reading on every Generate stream and wait (up to timeout) for them to flush."""
        for call in list(self._calls):
            call.close()
        await self._streams_ended(timeout)

    async def stop_streams_now(self, timeout: float) -> None:
        """Stop without a grace period: on every Generate stream, each live request gets an Error
        (UNAVAILABLE) instead of the rest of its output; waits (up to timeout) for the streams to flush."""
        stopping = RequestError(
            ErrorCode.UNAVAILABLE,
            "the server is stopping now: the generation was cut short (retry it elsewhere)",
        )
        for call in list(self._calls):
            call.stop_now(stopping)
        await self._streams_ended(timeout)

    async def _streams_ended(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._calls and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        engine = await self._engine(context)
        principal = await self._principal(context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
        try:
            check_printable_id(request.request_id)  # no live request could have it: say why
        except RequestError as error:
            await context.abort(convert.status_code(error.code), convert.describe(error, root=""))
        # Only the caller's own requests, unless it is an operator: another's ids are not even probed.
        summary = await engine.cancel(request.request_id, None if principal.operator else principal.name)
        if summary is None:
            return pb.CancelResponse(found=False)
        return pb.CancelResponse(found=True, summary=convert.finished_to_pb(summary))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        info = (await self._engine(context)).model_info()
        return pb.ModelInfo(
            model=info.name,
            source=info.source,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            device=info.device,
            dtype=info.dtype,
            max_batch_size=info.max_batch_size,
            max_live_requests=info.max_live_requests,
            has_chat_template=info.has_chat_template,
            server_version=tokenwire.__version__,
            weights=info.weights,
            activations=info.activations,
            kv_cache_dtype=info.kv_cache_dtype,
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        engine = await self._engine(context)
        kind = request.WhichOneof("input")
        # The engine tokenizes on its tokenizer thread, like a Start's input; the checks here, and the
        # message size limit that gRPC applies before this runs, come first.
        try:
            if kind == "text":
                tokenized = await engine.tokenize_text(request.text)
            elif kind == "chat":
                tokenized = await engine.tokenize_chat(convert.chat_to_messages(request.chat, "chat"))
            else:
                raise MessageError(ErrorCode.INVALID_ARGUMENT, "input: set text or chat", "input")
        except RequestError as error:
            # The request's fields sit in the TokenizeRequest itself: no "start." before their paths.
            await context.abort(convert.status_code(error.code), convert.describe(error, root=""))
        return pb.TokenizeResponse(token_ids=tokenized.token_ids, tokens=tokenized.tokens)


def _request_id_of(message: pb.GenerateRequest) -> str:
    kind = message.WhichOneof("kind")
    if kind == "start":
        return message.start.request_id
    if kind == "interrupt":
        return message.interrupt.request_id
    return ""

"""The asyncio client: AsyncClient, AsyncStream (several generations on one Generate RPC), AsyncGeneration."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

from . import _convert
from ._channel import (
    DEFAULT_ADDRESS,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_KEEPALIVE_S,
    RETRY_BACKOFF_S,
    ChannelConfig,
    open_async,
    replica_metadata,
    wait_ready_async,
)
from ._errors import (
    AlreadyExists,
    Cancelled,
    ServerError,
    TokenWireError,
    from_rpc_error,
)
from ._types import (
    CancelResult,
    Chunk,
    HealthStatus,
    InterruptMode,
    MessageLike,
    ModelInfo,
    Result,
    Tokens,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._types import GenerateOptions

__all__ = ["AsyncClient", "AsyncGeneration", "AsyncStream"]

log = logging.getLogger("tokenwire.client")

# What a generation's queue carries: the raw response (None for a failure of the whole RPC) and the
# typed event it folded into (None for Started).
_Item = tuple["pb.GenerateResponse | None", "Chunk | Result | BaseException | None"]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: a failure nobody asks about is not worth a warning."""
    if not future.cancelled():
        future.exception()


class AsyncGeneration:
    """One generation: an async iterator of Chunks, then `.result`.

    Iterating ends after the last chunk; a failure (an Error message for this request, or the RPC
    failing) is raised from the iteration, and from `.result`. Returned by `AsyncClient.generate`
    (which owns a Generate RPC for it alone) and by `AsyncStream.start` (one of several on an RPC)."""

    def __init__(self, stream: AsyncStream, request_id: str, *, owns_stream: bool) -> None:
        self.request_id = request_id
        self._stream = stream
        self._owns_stream = owns_stream
        self._state = _convert.RequestState(request_id)
        self._items: asyncio.Queue[_Item] = asyncio.Queue()
        self._done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._done.add_done_callback(_retrieve)
        self._starting: asyncio.Task[None] | None = None
        self._exhausted = False

    # ---- fed by the stream's reader ----

    def _push(self, response: pb.GenerateResponse) -> bool:
        """Take one response; returns True when it was the last one for this request."""
        event = self._state.feed(response)
        self._items.put_nowait((response, event))
        if isinstance(event, Result):
            self._done.set_result(event)
        elif isinstance(event, TokenWireError):
            self._done.set_exception(event)
        return self._done.done()

    def _fail(self, error: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(error)
            self._items.put_nowait((None, error))

    # ---- the caller's side ----

    @property
    def done(self) -> bool:
        """Whether the last message (Finished or Error) has arrived."""
        return self._done.done()

    @property
    def replica(self) -> str | None:
        """The replica that serves this generation (see AsyncStream.replica)."""
        return self._stream.replica

    @property
    def result(self) -> Result:
        """The Result once the generation has finished; raises its error if it failed."""
        if not self._done.done():
            raise RuntimeError("the generation has not finished: iterate it, or await final_result()")
        return self._done.result()

    async def final_result(self) -> Result:
        """Wait for the end and return the Result (chunks not yet iterated stay available)."""
        await self._wait_started()
        return await asyncio.shield(self._done)

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> Chunk:
        while (item := await self._next_item()) is not None:
            event = item[1]
            if isinstance(event, Chunk):
                return event
            if isinstance(event, BaseException):
                raise event
        raise StopAsyncIteration

    @property
    def text_stream(self) -> AsyncIterator[str]:
        """Just the text of each chunk."""
        return (chunk.text async for chunk in self)

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        """The raw tokenwire.v1 GenerateResponse messages (Started, Chunks, Finished or Error), for
        logging or relaying. An Error message is yielded, not raised; a failed RPC still raises."""
        while (item := await self._next_item()) is not None:
            response, event = item
            if response is None:
                assert isinstance(event, BaseException)
                raise event
            yield response

    async def _next_item(self) -> _Item | None:
        """The next queued item, or None once the last one (Finished, Error, failure) was taken."""
        await self._wait_started()
        if self._exhausted:
            return None
        item = await self._items.get()
        if isinstance(item[1], Result | BaseException):
            self._exhausted = True
        return item

    async def _wait_started(self) -> None:
        # asyncio.wait, not await: how the start failed is already queued as this generation's failure.
        if self._starting is not None and not self._starting.done():
            await asyncio.wait({self._starting})

    async def interrupt(self, mode: InterruptMode | str = InterruptMode.IMMEDIATE) -> Result:
        """Stop this generation (see AsyncStream.interrupt) and return its Result; if it has ended
        already, just return its Result."""
        await self._wait_started()
        if self._done.done():
            return self.result
        return await self._stream.interrupt(self.request_id, mode)

    async def aclose(self) -> None:
        """Stop the generation if it is still running: cancels its own RPC, or interrupts it on a shared
        stream (without waiting). Chunks already received stay readable."""
        if self._done.done():
            return
        if self._owns_stream:
            if self._starting is not None:
                self._starting.cancel()
            self._stream.cancel()
        else:
            # A stream that is closed or failed cannot carry it; the generation ends with the stream.
            with contextlib.suppress(RuntimeError, TokenWireError):
                await self._stream._send_interrupt(self.request_id, InterruptMode.IMMEDIATE)

    async def __aenter__(self) -> AsyncGeneration:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "done" if self._done.done() else "running"
        return f"<AsyncGeneration {self.request_id} {state}>"


class AsyncStream:
    """One Generate RPC carrying several generations: `start` them, `interrupt` any, iterate each.

    Use it as `async with client.stream() as stream:`. Leaving the block normally half-closes the
    request side ("no more requests") and waits for the running generations to end; leaving it with an
    exception cancels the RPC, which stops them all. One reader task takes every response off the wire
    and hands it to its generation, so generations may be iterated in any order or not at all."""

    def __init__(self, client: AsyncClient, timeout: float | None, *, close_when_idle: bool = False) -> None:
        self._client = client
        self._timeout = timeout
        self._close_when_idle = close_when_idle  # for generate(): half-close once its one request ends
        self._call: Any = None  # grpc.aio.StreamStreamCall
        self._reader: asyncio.Task[None] | None = None
        self._open_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._live: dict[str, AsyncGeneration] = {}
        self._interrupt_waiters: dict[str, list[asyncio.Future[Result]]] = {}
        self._half_closed = False
        self._cancelled = False
        self._failure: TokenWireError | None = None  # why the RPC failed, when it did
        self._ended = False
        self._replica: str | None = None
        self._headers: asyncio.Future[None] | None = None  # done once the response headers are read
        self._heartbeat: asyncio.Task[None] | None = None
        self._heartbeat_writing = False  # cancelling a grpc.aio write would cancel the whole RPC
        self._last_write = 0.0
        self.unclaimed_errors: list[TokenWireError] = []
        """Error messages that belonged to no generation or interrupt still waiting on this stream (for
        example the server's NOT_FOUND answer to an interrupt that crossed its request's Finished)."""

    @property
    def replica(self) -> str | None:
        """The replica serving this stream: the x-tokenwire-replica header it answered with (None until
        the headers arrive, or when the server has no --replica-id). The client sends it back on its own
        `cancel` of a generation started here; another process cancelling one needs it, so a proxy can
        route the Cancel (`cancel(id, replica=...)`)."""
        return self._replica

    async def _replica_known(self, timeout: float | None) -> str | None:
        """The replica, once the headers have come (waiting up to `timeout` s for them)."""
        if self._headers is not None and not self._headers.done():
            await asyncio.wait({self._headers}, timeout=timeout)
        return self._replica

    async def __aenter__(self) -> AsyncStream:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.cancel()

    # ---- requests ----

    async def start(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> AsyncGeneration:
        """Start a generation on this stream (the same options as AsyncClient.generate); returns its
        handle once the Start message is sent. Refusals (InvalidArgument, AlreadyExists, ...) are raised
        when the handle is iterated."""
        _convert.check_options(options, "start")
        request_id = options.get("request_id") or _convert.new_request_id()
        start = _convert.build_start(request_id, prompt, options)
        generation = AsyncGeneration(self, request_id, owns_stream=False)
        await self._start(generation, start)
        return generation

    async def interrupt(self, request_id: str, mode: InterruptMode | str = InterruptMode.IMMEDIATE) -> Result:
        """Stop a generation started on this stream and wait for its acknowledged stop: the Result says
        what text was sent before it ("immediate": at the next decode step; "after_segment": once the
        current sentence/clause is sent). An id that is not live on this stream (unknown, or ended
        already) raises NotFound; if it ends on its own just before the interrupt arrives, its Result
        comes back as usual."""
        generation = self._live.get(request_id)
        if generation is not None:
            answer: asyncio.Future[Result] = generation._done
        else:
            answer = asyncio.get_running_loop().create_future()
            answer.add_done_callback(_retrieve)
            self._interrupt_waiters.setdefault(request_id, []).append(answer)
        await self._send_interrupt(request_id, mode)
        return await asyncio.shield(answer)

    async def _send_interrupt(self, request_id: str, mode: InterruptMode | str) -> None:
        await self._write(_convert.build_interrupt(request_id, mode))

    async def _start(self, generation: AsyncGeneration, start: pb.Start) -> None:
        await self._open()
        request_id = generation.request_id
        # Responses are routed by request id, so two live requests with one id cannot share a stream;
        # across streams the server refuses the second (ALREADY_EXISTS) itself.
        if request_id in self._live:
            raise AlreadyExists(
                f"request_id {request_id!r} is already live on this stream", field="start.request_id"
            )
        self._live[request_id] = generation  # before sending: the answer may come at once
        self._client._started[request_id] = self  # cancel() finds the replica to route to here
        try:
            await self._write(pb.GenerateRequest(start=start))
        except BaseException:
            self._live.pop(request_id, None)
            self._forget(request_id)
            raise

    # ---- the RPC ----

    async def _open(self) -> None:
        async with self._open_lock:
            if self._call is not None:
                return
            if self._cancelled:
                raise Cancelled("the stream was cancelled")
            if self._half_closed:
                raise RuntimeError("the stream is closed")
            config = self._client._config
            stub = await self._client._connected_stub(config.connect_timeout)
            self._call = stub.Generate(timeout=self._timeout, metadata=config.metadata)
            loop = asyncio.get_running_loop()
            self._headers = loop.create_future()
            self._last_write = loop.time()
            self._reader = asyncio.create_task(self._read(), name="tokenwire-stream-reader")
            if config.heartbeat_s:
                self._heartbeat = asyncio.create_task(
                    self._beat(config.heartbeat_s), name="tokenwire-stream-heartbeat"
                )

    async def _write(self, request: pb.GenerateRequest) -> None:
        if self._half_closed or self._cancelled or self._ended:
            raise self._failure or RuntimeError("the stream is closed")
        async with self._write_lock:  # grpc.aio allows one write in flight at a time
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as error:
                raise from_rpc_error(error) from None
            except asyncio.InvalidStateError:  # the RPC ended between the check above and the write
                raise self._failure or Cancelled("the stream has ended") from None
            self._last_write = asyncio.get_running_loop().time()

    async def _beat(self, interval: float) -> None:
        """Send a Heartbeat whenever the request side has been silent for `interval` s: a proxy (nginx's
        client_body_timeout) would otherwise cut a stream whose caller has nothing to say for a while."""
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_write + interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            async with self._write_lock:
                if self._half_closed or self._cancelled or self._ended:
                    return
                self._heartbeat_writing = True
                try:
                    await self._call.write(_convert.HEARTBEAT_REQUEST)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    return  # the RPC has ended: the reader reports how
                finally:
                    self._heartbeat_writing = False
                self._last_write = loop.time()

    def _stop_heartbeat(self) -> None:
        # Not while it writes: cancelling a grpc.aio write cancels the RPC (it then stops on its own).
        if self._heartbeat is not None and not self._heartbeat_writing:
            self._heartbeat.cancel()

    async def _read(self) -> None:
        failure: TokenWireError | None = None  # None: the RPC ended cleanly
        try:
            self._replica = _convert.replica_from(await self._call.initial_metadata())
            if self._headers is not None and not self._headers.done():
                self._headers.set_result(None)
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    break
                self._dispatch(response)
                if self._close_when_idle and not self._live:
                    await self._half_close()
        except grpc.aio.AioRpcError as error:
            failure = from_rpc_error(error)
        except asyncio.CancelledError:
            # read() raises this when the call is cancelled (cancel(), the client closing its channel)
            # as well as when this task is: only the latter is passed on (Python 3.11+ can tell).
            self._end(Cancelled("the stream was cancelled"))
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():
                raise
            return
        except Exception as error:  # a bug here must not leave generations waiting for ever
            log.exception("tokenwire stream reader failed")
            failure = ServerError(f"the client's stream reader failed: {error!r}")
        self._end(failure)

    def _dispatch(self, response: pb.GenerateResponse) -> None:
        if _convert.is_heartbeat(response):
            return  # the server keeps a proxy from cutting a quiet stream: nothing for anyone here
        request_id = response.request_id
        is_error = response.WhichOneof("kind") == "error"
        # An Error about an Interrupt answers the interrupt; it never ends the request it names (the id
        # may even belong to a newer request by now).
        if is_error and _convert.answers_interrupt(response.error):
            error = _convert.error_from_pb(request_id, response.error)
            waiters = self._interrupt_waiters.get(request_id)
            if waiters:
                waiters.pop(0).set_exception(error)
                if not waiters:
                    del self._interrupt_waiters[request_id]
            else:
                self.unclaimed_errors.append(error)
            return
        generation = self._live.get(request_id)
        if generation is None:
            if is_error:
                self.unclaimed_errors.append(_convert.error_from_pb(request_id, response.error))
            else:
                log.debug("response for unknown request %r dropped", request_id)
            return
        if generation._push(response):
            del self._live[request_id]
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        """The request has ended: the client's cancel() no longer looks for its replica here."""
        if self._client._started.get(request_id) is self:
            del self._client._started[request_id]

    def _end(self, failure: TokenWireError | None) -> None:
        """The RPC is over (`failure` says why; None: it ended cleanly). Whatever still waits fails."""
        self._ended = True
        self._failure = self._failure or failure
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._headers is not None and not self._headers.done():
            self._headers.set_result(None)
        leftover = failure or ServerError("the stream ended before the request finished")
        for generation in self._live.values():
            generation._fail(_for_request(leftover, generation.request_id))
            self._forget(generation.request_id)
        self._live.clear()
        for waiters in self._interrupt_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(leftover)
        self._interrupt_waiters.clear()

    async def _half_close(self) -> None:
        if self._half_closed or self._call is None:
            self._half_closed = True
            return
        self._half_closed = True
        async with self._write_lock:
            self._stop_heartbeat()  # it is not writing: we hold the lock
            # When the RPC has already ended, the reader reports how.
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await self._call.done_writing()

    async def aclose(self) -> None:
        """Half-close ("no more requests") and wait for the running generations to end. If this wait is
        cancelled, the RPC is cancelled too."""
        await self._half_close()
        if self._reader is None:
            return
        try:
            await asyncio.shield(self._reader)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the RPC: the server stops every generation on it at its next decode step."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
            if self._heartbeat is not None:
                self._heartbeat.cancel()  # the RPC is cancelled anyway
        else:
            self._end(Cancelled("the stream was cancelled"))

    def __repr__(self) -> str:
        return f"<AsyncStream live={sorted(self._live)}>"


def _for_request(failure: TokenWireError, request_id: str) -> TokenWireError:
    """A copy of an RPC-wide failure that names the generation it ended."""
    return type(failure)(failure.message, code=failure.code, field=failure.field, request_id=request_id)


class AsyncClient:
    """An asyncio client for a tokenwire server.

        async with AsyncClient("127.0.0.1:50051") as client:
            async with client.generate("Once upon a time", max_tokens=32) as generation:
                async for chunk in generation:
                    print(chunk.text, end="", flush=True)
            print(generation.result.reason)

    `timeout` is the deadline of each unary call (cancel, model_info, tokenize, health); a Generate
    stream has no deadline unless given one (`generate(..., timeout=)`), since generations run long:
    prefer `time_limit_ms`, which ends a generation cleanly with its Result. Before each call the client
    waits up to `connect_timeout` seconds for the connection (gRPC retries meanwhile), then raises
    Unavailable saying why the last attempt failed; unary calls are retried on UNAVAILABLE within that
    time, a stream never is once started. `wait_for_server=False` gives up at the first failed attempt
    instead (a refused connection, an unknown host, a failed TLS handshake: Unavailable; an address
    that cannot be parsed: InvalidArgument), so `connect_timeout` then only bounds a host that does
    not answer. The channel is made on first use and belongs to the event loop in use then.

    `heartbeat_s`: a Generate stream whose request side has sent nothing this long sends a Heartbeat
    message, so that a proxy in between does not cut it as idle (nginx: 60 s); None or 0: never.

    `load_balancing="round_robin"` spreads calls over every address the target resolves to, for
    replicas without a proxy: `AsyncClient("dns:///tokenwire-headless:50051", load_balancing=
    "round_robin")` over a headless Kubernetes Service (each stream then stays on the server it
    started on). A unary `cancel` would go to the next server, not necessarily the one running the
    generation: when the replicas' ids are their IP addresses (`--replica-id` set to the pod's IP, as
    deploy/kubernetes does), it goes to that address at the target's port instead, for this client's
    own generations and for `cancel(id, replica=IP)`; with other ids it finds the generation only by
    chance (closing a generation, or interrupting it on its stream, always reaches its server). None
    (default): gRPC's pick_first, one connection."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: bool = False,
        ca_file: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        token: str | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
        keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
        wait_for_server: bool = True,
        heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
        load_balancing: str | None = None,
    ) -> None:
        self._config = ChannelConfig(
            address,
            tls,
            ca_file,
            client_cert,
            client_key,
            token,
            timeout,
            connect_timeout,
            keepalive_s,
            wait_for_server,
            heartbeat_s,
            load_balancing,
        )
        if self._config.secure:
            self._config.credentials()  # read the PEM files now: a wrong path fails here, not later
        self._channel: Any = None  # grpc.aio.Channel, made on first use (it binds to the running loop)
        # With load_balancing="round_robin": a channel to each server a Cancel had to reach, by address.
        self._pinned: dict[str, Any] = {}
        self._stub: pb_grpc.TokenWireStub | None = None
        # Live generations this client started, by id, and their streams: cancel() routes by their replica.
        self._started: dict[str, AsyncStream] = {}
        self._health_check: Any = None
        self._closed = False

    @property
    def address(self) -> str:
        return self._config.address

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel; calls still running are cancelled."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()
        for channel in self._pinned.values():
            await channel.close()

    # ---- generating ----

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncGeneration:
        """Start one generation on its own Generate RPC; returns at once (call it inside a coroutine).

        Give the input as `prompt` (raw text), `messages=` (chat turns) or `token_ids=`; the other
        options are listed on GenerateOptions. Iterate the result for Chunks; `.result` afterwards (or
        `await .final_result()`). Leaving the loop early does not stop the generation: use
        `async with client.generate(...) as generation:` or `await generation.aclose()` for that.
        Connection failures and refusals are raised by the first iteration."""
        _convert.check_options(options, "generate")
        request_id = options.get("request_id") or _convert.new_request_id()
        start = _convert.build_start(request_id, prompt, options)
        stream = AsyncStream(self, timeout, close_when_idle=True)
        generation = AsyncGeneration(stream, request_id, owns_stream=True)
        generation._starting = asyncio.get_running_loop().create_task(_begin(stream, generation, start))
        return generation

    async def complete(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Result:
        """Generate and return just the Result (its `.text` holds the whole text)."""
        generation = self.generate(prompt, timeout=timeout, **options)
        async with generation:
            return await generation.final_result()

    def stream(self, *, timeout: float | None = None) -> AsyncStream:
        """A Generate RPC for several generations: `async with client.stream() as stream: ...`."""
        return AsyncStream(self, timeout)

    # ---- unary calls ----

    async def cancel(self, request_id: str, *, replica: str | None = None) -> CancelResult:
        """Stop a live generation by id, from any connection. Idempotent: unknown ids give found=False.

        Behind a load balancer the Cancel carries the x-tokenwire-replica header, so that the proxy routes
        it to the replica that holds the generation: for a live generation this client started, the
        replica its stream answered with (`generation.replica`); for another's, pass `replica`."""
        if replica is None and request_id in self._started:
            replica = await self._started[request_id]._replica_known(self._config.connect_timeout)
        # round_robin would send the Cancel to the next server, not necessarily the one that runs the
        # generation: call that one when its replica id is its address.
        pinned = self._config.pinned(replica) if self._config.balanced else None
        channel = None if pinned is None else self._pinned_channel(pinned)
        stub = (lambda: self._stub_()) if channel is None else (lambda: pb_grpc.TokenWireStub(channel))
        response = await self._unary(
            lambda: stub().Cancel,
            pb.CancelRequest(request_id=request_id),
            replica_metadata(replica),
            channel=channel,
        )
        return _convert.cancel_result_from_pb(response)

    async def model_info(self) -> ModelInfo:
        response = await self._unary(lambda: self._stub_().GetModelInfo, pb.GetModelInfoRequest())
        return _convert.model_info_from_pb(response)

    async def tokenize(
        self, text: str | None = None, *, messages: Sequence[MessageLike] | None = None
    ) -> Tokens:
        """Token ids of text, or of chat messages rendered with the model's chat template."""
        request = (
            pb.TokenizeRequest(text=text)
            if messages is None
            else pb.TokenizeRequest(chat=_convert.chat_to_pb(messages))
        )
        response = await self._unary(lambda: self._stub_().Tokenize, request)
        return _convert.tokens_from_pb(response)

    async def health(self, service: str = "") -> HealthStatus:
        """The grpc.health.v1 status of `service` ("" for the whole server)."""
        from grpc_health.v1 import health_pb2  # only health() needs grpcio-health-checking

        def method() -> Any:
            if self._health_check is None:
                self._stub_()
                self._health_check = self._channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
            return self._health_check

        response = await self._unary(method, health_pb2.HealthCheckRequest(service=service))
        return _convert.health_from_number(response.status)

    # ---- plumbing ----

    def _stub_(self) -> pb_grpc.TokenWireStub:
        if self._stub is None:
            if self._closed:
                raise RuntimeError("the client is closed")
            self._channel = open_async(self._config)
            self._stub = pb_grpc.TokenWireStub(self._channel)
        return self._stub

    def _pinned_channel(self, config: ChannelConfig) -> Any:
        """A channel (grpc.aio) to the one server `config` names, kept for the client's life."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if config.address not in self._pinned:
            self._pinned[config.address] = open_async(config)
        return self._pinned[config.address]

    async def _connected_stub(self, timeout: float | None) -> pb_grpc.TokenWireStub:
        """The stub once the channel is connected; Unavailable after `timeout` s (None: no limit)."""
        stub = self._stub_()
        await wait_ready_async(self._channel, self._config, timeout)
        return stub

    async def _unary(
        self,
        method: Callable[[], Any],
        request: Any,
        extra: tuple[tuple[str, str], ...] = (),
        *,
        channel: Any = None,
    ) -> Any:
        """Call `method()` (retried on UNAVAILABLE within connect_timeout) once the client's channel, or
        `channel` when given, is connected."""
        config = self._config
        loop = asyncio.get_running_loop()
        deadline = None if config.connect_timeout is None else loop.time() + config.connect_timeout
        for attempt in itertools.count():
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            if channel is None:
                await self._connected_stub(remaining)
            else:
                await wait_ready_async(channel, config, remaining)
            try:
                metadata = config.metadata + extra
                return await method()(request, timeout=config.timeout, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                # The connection dropped, or the server is still loading, before the call got through.
                # Every unary call here is idempotent, so try again while still within connect_timeout.
                retry = error.code() == grpc.StatusCode.UNAVAILABLE and (
                    deadline is None or loop.time() < deadline
                )
                if not retry:
                    raise from_rpc_error(error) from None
            await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        raise AssertionError("unreachable")


async def _begin(stream: AsyncStream, generation: AsyncGeneration, start: pb.Start) -> None:
    """generate()'s start, run as a task: a failure ends the generation instead of escaping here."""
    try:
        await stream._start(generation, start)
    except asyncio.CancelledError:  # aclose() before the Start was sent
        generation._fail(
            Cancelled("the generation was closed before it started", request_id=generation.request_id)
        )
        stream.cancel()
        raise
    except Exception as error:
        generation._fail(error)
        stream.cancel()

"""The blocking client: Client, Stream (several generations on one Generate RPC), Generation.

Built on grpc's own synchronous channel. A Generate RPC has one reader thread that takes responses off
the wire and queues them per generation, so the caller's thread only ever waits on a queue: Ctrl-C
(KeyboardInterrupt) can land there safely, and the generation can still be interrupted or read after.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
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
    open_sync,
    replica_metadata,
    wait_ready_sync,
)
from ._errors import AlreadyExists, Cancelled, ServerError, TokenWireError, from_rpc_error
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

__all__ = ["Client", "Generation", "Stream"]

log = logging.getLogger("tokenwire.client")

# The raw response (None for a failure of the whole RPC) and the typed event it folded into.
_Item = tuple["pb.GenerateResponse | None", "Chunk | Result | BaseException | None"]


class Generation:
    """One generation: an iterator of Chunks, then `.result`.

    Iterating ends after the last chunk; a failure (an Error message for this request, the RPC failing,
    or the RPC ending, even with OK, before this request's Finished: ServerError) is raised from the
    iteration, and from `.result`. A generation ends once: what the server sends for its id after its
    Finished or Error never reaches it (see Stream.unclaimed_errors). Returned by `Client.generate`
    (which owns a Generate RPC for it alone) and by `Stream.start` (one of several on an RPC). Safe to
    iterate from one thread while another interrupts it."""

    def __init__(self, stream: Stream, request_id: str, *, owns_stream: bool) -> None:
        self.request_id = request_id
        self._stream = stream
        self._owns_stream = owns_stream
        self._state = _convert.RequestState(request_id)
        # SimpleQueue: its put() is reentrant, and get() may be interrupted by Ctrl-C and called again.
        self._items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._done: Future[Result] = Future()
        self._exhausted = False

    # ---- fed by the stream's reader thread ----

    def _push(self, response: pb.GenerateResponse) -> bool:
        """Take one response; returns True when it was the last one for this request."""
        event = self._state.feed(response)
        self._items.put((response, event))
        if isinstance(event, Result):
            self._done.set_result(event)
        elif isinstance(event, TokenWireError):
            self._done.set_exception(event)
        return self._done.done()

    def _fail(self, error: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(error)
            self._items.put((None, error))

    # ---- the caller's side ----

    @property
    def done(self) -> bool:
        """Whether the last message (Finished or Error) has arrived."""
        return self._done.done()

    @property
    def replica(self) -> str | None:
        """The replica that serves this generation (see Stream.replica)."""
        return self._stream.replica

    @property
    def result(self) -> Result:
        """The Result once the generation has finished; raises its error if it failed."""
        if not self._done.done():
            raise RuntimeError("the generation has not finished: iterate it, or call final_result()")
        return self._done.result()

    def final_result(self, timeout: float | None = None) -> Result:
        """Wait (up to `timeout` seconds) for the end and return the Result; chunks not yet iterated
        stay available."""
        return self._done.result(timeout)

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        while (item := self._next_item()) is not None:
            event = item[1]
            if isinstance(event, Chunk):
                return event
            if isinstance(event, BaseException):
                raise event
        raise StopIteration

    @property
    def text_stream(self) -> Iterator[str]:
        """Just the text of each chunk."""
        return map(_text_of, self)

    def responses(self) -> Iterator[pb.GenerateResponse]:
        """The raw tokenwire.v1 GenerateResponse messages (Started, Chunks, Finished or Error), for
        logging or relaying. An Error message is yielded, not raised; a failed RPC still raises."""
        return _Responses(self)

    def _next_item(self) -> _Item | None:
        """The next queued item, or None once the last one (Finished, Error, failure) was taken."""
        if self._exhausted:
            return None
        item = self._items.get()
        if isinstance(item[1], Result | BaseException):
            self._exhausted = True
        return item

    def interrupt(
        self, mode: InterruptMode | str = InterruptMode.IMMEDIATE, timeout: float | None = None
    ) -> Result:
        """Stop this generation (see Stream.interrupt) and return its Result; if it has ended already,
        just return its Result."""
        if self._done.done():
            return self.result
        return self._stream.interrupt(self.request_id, mode, timeout=timeout)

    def close(self) -> None:
        """Stop the generation if it is still running: cancels its own RPC, or interrupts it on a shared
        stream (without waiting). Chunks already received stay readable."""
        if self._done.done():
            return
        if self._owns_stream:
            self._stream.cancel()
        else:
            # A stream that is closed or failed cannot carry it; the generation ends with the stream.
            with contextlib.suppress(RuntimeError, TokenWireError):
                self._stream._write(_convert.build_interrupt(self.request_id, InterruptMode.IMMEDIATE))

    def __enter__(self) -> Generation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "done" if self._done.done() else "running"
        return f"<Generation {self.request_id} {state}>"


def _text_of(chunk: Chunk) -> str:
    return chunk.text


class _Responses:
    """Generation.responses(): an iterator object rather than a generator, so that a KeyboardInterrupt
    raised while it waits leaves it usable (a generator would be finished by the exception)."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    def __iter__(self) -> _Responses:
        return self

    def __next__(self) -> pb.GenerateResponse:
        item = self._generation._next_item()
        if item is None:
            raise StopIteration
        response, event = item
        if response is None:
            assert isinstance(event, BaseException)
            raise event
        return response


class Stream:
    """One Generate RPC carrying several generations: `start` them, `interrupt` any, iterate each.

    Use it as `with client.stream() as stream:`. Leaving the block normally half-closes the request
    side ("no more requests") and waits for the running generations to end; leaving it with an exception
    cancels the RPC, which stops them all."""

    def __init__(self, client: Client, timeout: float | None, *, close_when_idle: bool = False) -> None:
        self._client = client
        self._timeout = timeout
        self._close_when_idle = close_when_idle  # for generate(): half-close once its one request ends
        # What grpc sends, in order; None half-closes. grpc reads it from a thread of its own.
        self._requests: queue.SimpleQueue[pb.GenerateRequest | None] = queue.SimpleQueue()
        self._call: Any = None  # grpc's stream-stream call: an iterator of responses, and a grpc.Future
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()  # guards everything below, shared with the reader thread
        self._live: dict[str, Generation] = {}
        self._interrupt_waiters: dict[str, list[Future[Result]]] = {}
        self._half_closed = False
        self._cancelled = False
        self._failure: TokenWireError | None = None  # why the RPC failed, when it did
        self._ended = False
        self._replica: str | None = None
        self._headers = threading.Event()  # set once the response headers are read (or cannot be)
        self.unclaimed_errors: list[TokenWireError] = []
        """Error messages that belonged to no generation or interrupt still waiting on this stream (for
        example the server's NOT_FOUND answer to an interrupt that crossed its request's Finished, or an
        Error for an id never started here). They end nothing. Other responses for an id that is not live
        here (a Chunk or a second Finished after its request's end) are dropped."""

    @property
    def replica(self) -> str | None:
        """The replica serving this stream: the x-tokenwire-replica header it answered with (None until
        the headers arrive, when the server has no --replica-id, or on a channel passed to the Client,
        whose headers are not read). The client sends it back on its own `cancel` of a generation
        started here; another process needs it to cancel one behind a proxy (`cancel(id, replica=...)`)."""
        return self._replica

    def _replica_known(self, timeout: float | None) -> str | None:
        """The replica, once the headers have come (waiting up to `timeout` s for them)."""
        self._headers.wait(timeout)
        return self._replica

    def __enter__(self) -> Stream:
        self._open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    # ---- requests ----

    def start(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Generation:
        """Start a generation on this stream (the same options as Client.generate); returns its handle
        once the Start message is queued. Refusals (InvalidArgument, AlreadyExists, ...) are raised when
        the handle is iterated."""
        _convert.check_options(options, "start")
        request_id = options.get("request_id") or _convert.new_request_id()
        start = _convert.build_start(request_id, prompt, options)
        generation = Generation(self, request_id, owns_stream=False)
        self._start(generation, start)
        return generation

    def interrupt(
        self,
        request_id: str,
        mode: InterruptMode | str = InterruptMode.IMMEDIATE,
        *,
        timeout: float | None = None,
    ) -> Result:
        """Stop a generation started on this stream and wait (up to `timeout` s) for its acknowledged
        stop: the Result says what text was sent before it ("immediate": at the next decode step;
        "after_segment": once the current sentence/clause is sent). An id that is not live on this
        stream (unknown, or ended already) raises NotFound; if it ends on its own just before the
        interrupt arrives, its Result comes back as usual."""
        request = _convert.build_interrupt(request_id, mode)
        with self._lock:  # the answer is dispatched under this lock too: it cannot overtake us
            self._write_locked(request)
            generation = self._live.get(request_id)
            if generation is not None:
                answer = generation._done
            else:
                answer = Future()
                self._interrupt_waiters.setdefault(request_id, []).append(answer)
        return answer.result(timeout)

    def _start(self, generation: Generation, start: pb.Start) -> None:
        self._open()
        request_id = generation.request_id
        with self._lock:
            # Responses are routed by request id, so two live requests with one id cannot share a
            # stream; across streams the server refuses the second (ALREADY_EXISTS) itself.
            if request_id in self._live:
                raise AlreadyExists(
                    f"request_id {request_id!r} is already live on this stream", field="start.request_id"
                )
            # Checked and registered under the lock the reader fails everything under: either this
            # raises, or the reader's failure reaches the new generation.
            self._write_locked(pb.GenerateRequest(start=start))
            self._live[request_id] = generation
            self._client._started[request_id] = self  # cancel() finds the replica to route to here

    def _write(self, request: pb.GenerateRequest) -> None:
        with self._lock:
            self._write_locked(request)

    def _write_locked(self, request: pb.GenerateRequest) -> None:
        if self._half_closed or self._cancelled or self._ended:
            raise self._failure or RuntimeError("the stream is closed")
        self._requests.put(request)

    # ---- the RPC ----

    def _open(self) -> None:
        with self._lock:
            if self._call is not None:
                return
            if self._cancelled:
                raise Cancelled("the stream was cancelled")
            if self._half_closed:
                raise RuntimeError("the stream is closed")
        stub = self._client._connected_stub(self._client._config.connect_timeout)
        with self._lock:
            if self._call is not None:  # another thread opened it meanwhile
                return
            self._call = stub.Generate(
                self._request_iterator(), timeout=self._timeout, metadata=self._client._config.metadata
            )
            self._reader = threading.Thread(target=self._read, name="tokenwire-stream-reader", daemon=True)
            self._reader.start()

    def _request_iterator(self) -> Iterator[pb.GenerateRequest]:
        heartbeat_s = self._client._config.heartbeat_s or None
        while True:
            try:
                request = self._requests.get(timeout=heartbeat_s)
            except queue.Empty:
                # Silent for heartbeat_s: a proxy (nginx's client_body_timeout) would cut the stream.
                yield _convert.HEARTBEAT_REQUEST
                continue
            if request is None:
                return
            yield request

    def _read(self) -> None:
        failure: TokenWireError | None = None  # None: the RPC ended cleanly
        try:
            # A channel passed in may be a test double whose headers come only at the end: not waited for.
            if self._client._owns_channel:
                self._replica = _convert.replica_from(self._call.initial_metadata())
            self._headers.set()
            for response in self._call:
                self._dispatch(response)
                if self._close_when_idle and not self._live:
                    self._half_close()
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
        except Exception as error:  # a bug here must not leave generations waiting for ever
            log.exception("tokenwire stream reader failed")
            failure = ServerError(f"the client's stream reader failed: {error!r}")
        finally:
            self._requests.put(None)  # lets grpc's request thread finish, whatever ended the RPC
        self._end(failure)

    def _dispatch(self, response: pb.GenerateResponse) -> None:
        if _convert.is_heartbeat(response):
            return  # the server keeps a proxy from cutting a quiet stream: nothing for anyone here
        request_id = response.request_id
        is_error = response.WhichOneof("kind") == "error"
        with self._lock:
            # An Error about an Interrupt answers the interrupt; it never ends the request it names
            # (the id may even belong to a newer request by now).
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
        started = self._client._started
        if started.get(request_id) is self:
            started.pop(request_id, None)

    def _end(self, failure: TokenWireError | None) -> None:
        """The RPC is over (`failure` says why; None: it ended cleanly). Whatever still waits fails."""
        leftover = failure or ServerError("the stream ended before the request finished")
        self._headers.set()
        with self._lock:
            self._ended = True
            self._failure = self._failure or failure
            for generation in self._live.values():
                generation._fail(_for_request(leftover, generation.request_id))
                self._forget(generation.request_id)
            self._live.clear()
            for waiters in self._interrupt_waiters.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(leftover)
            self._interrupt_waiters.clear()

    def _half_close(self) -> None:
        with self._lock:
            if not self._half_closed:
                self._half_closed = True
                self._requests.put(None)

    def close(self) -> None:
        """Half-close ("no more requests") and wait for the running generations to end. Interrupted
        (Ctrl-C) while waiting, it cancels the RPC."""
        self._half_close()
        if self._reader is None:
            return
        try:
            self._reader.join()
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the RPC: the server stops every generation on it at its next decode step."""
        with self._lock:
            self._cancelled = True
            call = self._call
        if call is not None:
            call.cancel()  # the reader then fails whatever is still live with Cancelled
        else:
            self._end(Cancelled("the stream was cancelled"))
        self._requests.put(None)

    def __repr__(self) -> str:
        return f"<Stream live={sorted(self._live)}>"


def _for_request(failure: TokenWireError, request_id: str) -> TokenWireError:
    """A copy of an RPC-wide failure that names the generation it ended."""
    return type(failure)(failure.message, code=failure.code, field=failure.field, request_id=request_id)


class Client:
    """A blocking client for a tokenwire server.

        with Client("127.0.0.1:50051") as client:
            generation = client.generate("Once upon a time", max_tokens=32)
            for chunk in generation:
                print(chunk.text, end="", flush=True)
            print(generation.result.reason)

    The same API as AsyncClient (see there for `timeout`, `connect_timeout` and `wait_for_server`),
    blocking. `generate` starts at once and raises connection failures itself; refusals come from the
    iteration.

    `channel`: a grpc.Channel to call through instead of one the client opens to `address` (a channel
    with interceptors, or a `grpc_testing` channel in tests). The caller owns it: `close()` leaves it
    open, and the client does not wait for it to connect, so `connect_timeout` only bounds the unary
    calls' retries on UNAVAILABLE. `tls`, the certificates and `keepalive_s` configure a channel the
    client opens and do not apply (TLS settings with `channel` raise ValueError); `token` and `timeout`
    still do, and `address` only names the server in messages.

    `heartbeat_s`, `load_balancing`: see AsyncClient (`load_balancing` configures a channel the client
    opens: with `channel` it raises ValueError)."""

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
        channel: grpc.Channel | None = None,
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
        if channel is not None and self._config.secure:
            raise ValueError("tls, ca_file and client_cert apply to a channel the client opens")
        if channel is not None and load_balancing is not None:
            raise ValueError("load_balancing applies to a channel the client opens")
        # With load_balancing="round_robin": a channel to each server a Cancel had to reach, by address.
        self._pinned: dict[str, grpc.Channel] = {}
        self._pinned_lock = threading.Lock()
        self._owns_channel = channel is None
        # Making a channel does not connect: that happens on the first call.
        self._channel: grpc.Channel = open_sync(self._config) if channel is None else channel
        self._stub = pb_grpc.TokenWireStub(self._channel)
        self._health_check: Any = None
        # Live generations this client started, by id, and their streams: cancel() routes by their
        # replica. Written by the streams' reader threads; single dict operations are atomic.
        self._started: dict[str, Stream] = {}

    @property
    def address(self) -> str:
        return self._config.address

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still running are cancelled. A channel passed in stays open."""
        if self._owns_channel:
            self._channel.close()
        with self._pinned_lock:
            pinned, self._pinned = list(self._pinned.values()), {}
        for channel in pinned:
            channel.close()

    # ---- generating ----

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Generation:
        """Start one generation on its own Generate RPC.

        Give the input as `prompt` (raw text), `messages=` (chat turns) or `token_ids=`; the other
        options are listed on GenerateOptions. Iterate the result for Chunks; `.result` afterwards (or
        `.final_result()`). Leaving the loop early does not stop the generation: use
        `with client.generate(...) as generation:` or `generation.close()` for that."""
        _convert.check_options(options, "generate")
        request_id = options.get("request_id") or _convert.new_request_id()
        start = _convert.build_start(request_id, prompt, options)
        stream = Stream(self, timeout, close_when_idle=True)
        generation = Generation(stream, request_id, owns_stream=True)
        stream._start(generation, start)
        return generation

    def complete(
        self, prompt: str | None = None, *, timeout: float | None = None, **options: Unpack[GenerateOptions]
    ) -> Result:
        """Generate and return just the Result (its `.text` holds the whole text)."""
        with self.generate(prompt, timeout=timeout, **options) as generation:
            return generation.final_result()

    def stream(self, *, timeout: float | None = None) -> Stream:
        """A Generate RPC for several generations: `with client.stream() as stream: ...`."""
        return Stream(self, timeout)

    # ---- unary calls ----

    def cancel(self, request_id: str, *, replica: str | None = None) -> CancelResult:
        """Stop a live generation by id, from any connection. Idempotent: unknown ids give found=False.
        `replica`: see AsyncClient.cancel (for a live generation this client started, its own)."""
        stream = self._started.get(request_id) if replica is None else None
        if stream is not None:
            replica = stream._replica_known(self._config.connect_timeout)
        # round_robin would send the Cancel to the next server: see AsyncClient.cancel.
        pinned = self._config.pinned(replica) if self._config.balanced else None
        channel = None if pinned is None else self._pinned_channel(pinned)
        method = self._stub.Cancel if channel is None else pb_grpc.TokenWireStub(channel).Cancel
        response = self._unary(
            method, pb.CancelRequest(request_id=request_id), replica_metadata(replica), channel=channel
        )
        return _convert.cancel_result_from_pb(response)

    def model_info(self) -> ModelInfo:
        return _convert.model_info_from_pb(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest()))

    def tokenize(self, text: str | None = None, *, messages: Sequence[MessageLike] | None = None) -> Tokens:
        """Token ids of text, or of chat messages rendered with the model's chat template."""
        request = (
            pb.TokenizeRequest(text=text)
            if messages is None
            else pb.TokenizeRequest(chat=_convert.chat_to_pb(messages))
        )
        return _convert.tokens_from_pb(self._unary(self._stub.Tokenize, request))

    def health(self, service: str = "") -> HealthStatus:
        """The grpc.health.v1 status of `service` ("" for the whole server)."""
        from grpc_health.v1 import health_pb2  # only health() needs grpcio-health-checking

        if self._health_check is None:
            self._health_check = self._channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
        response = self._unary(self._health_check, health_pb2.HealthCheckRequest(service=service))
        return _convert.health_from_number(response.status)

    # ---- plumbing ----

    def _pinned_channel(self, config: ChannelConfig) -> grpc.Channel:
        """A channel to the one server `config` names, kept for the client's life."""
        with self._pinned_lock:
            if config.address not in self._pinned:
                self._pinned[config.address] = open_sync(config)
            return self._pinned[config.address]

    def _connected_stub(self, timeout: float | None) -> pb_grpc.TokenWireStub:
        """The stub once the channel is connected; Unavailable after `timeout` s (None: no limit). A
        channel passed in is the caller's to connect: it is used as it is."""
        if self._owns_channel:
            wait_ready_sync(self._channel, self._config, timeout)
        return self._stub

    def _unary(
        self,
        method: Callable[..., Any],
        request: Any,
        extra: tuple[tuple[str, str], ...] = (),
        *,
        channel: grpc.Channel | None = None,
    ) -> Any:
        """Call `method` (retried on UNAVAILABLE within connect_timeout) once the client's channel, or
        `channel` when given, is connected."""
        config = self._config
        deadline = None if config.connect_timeout is None else time.monotonic() + config.connect_timeout
        for attempt in itertools.count():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if channel is None:
                self._connected_stub(remaining)
            else:
                wait_ready_sync(channel, config, remaining)
            try:
                return method(request, timeout=config.timeout, metadata=config.metadata + extra)
            except grpc.RpcError as error:
                # The connection dropped, or the server is still loading, before the call got through.
                # Every unary call here is idempotent, so try again while still within connect_timeout.
                retry = error.code() == grpc.StatusCode.UNAVAILABLE and (
                    deadline is None or time.monotonic() < deadline
                )
                if not retry:
                    raise from_rpc_error(error) from None
            time.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
        raise AssertionError("unreachable")

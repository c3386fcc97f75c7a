"""The blocking client against a scripted server: grpc_testing's channel lets each test send exactly what
the "server" sends, including what a real server rarely does: an Error for an id never started, a stream
that ends without a request's Finished, messages after a request's last one, UNAVAILABLE mid-stream.

The test thread plays the server. Everything that can block (taking an RPC or a request, reading a
generation, a call waiting for its answer) runs on a daemon thread and is waited for with a timeout, so a
client that hangs fails its test instead of stalling the run; nothing waits by sleeping."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar
from unittest import mock

import grpc
import grpc_testing
import pytest

from tokenwire.client import (
    Cancelled,
    CancelResult,
    Chunk,
    Client,
    InvalidArgument,
    NotFound,
    Result,
    ServerError,
    StopReason,
    Stream,
    Summary,
    Timings,
    Unavailable,
    Usage,
)
from tokenwire.v1 import tokenwire_pb2 as pb

pytestmark = pytest.mark.timeout(60)  # a backstop only: every wait below has its own, shorter limit

WAIT_S = 10.0  # far beyond what any step takes; only reached when the client hangs
SERVICE = pb.DESCRIPTOR.services_by_name["TokenWire"]
GENERATE = SERVICE.methods_by_name["Generate"]
CANCEL = SERVICE.methods_by_name["Cancel"]
TOKEN = "s3cret"

T = TypeVar("T")


# ---- bounded waiting ----


def in_thread(fn: Callable[[], T]) -> Future[T]:
    """Run `fn` on a daemon thread; a call that never returns cannot keep pytest alive."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name="scripted-test-call", daemon=True).start()
    return future


def wait(future: Future[T], timeout: float = WAIT_S) -> T:
    """The future's result (or its exception, raised); a failed test if it is not done in time."""
    done, _ = concurrent.futures.wait([future], timeout)
    if not done:
        pytest.fail(f"still blocked after {timeout} s")
    return future.result()


def bounded(fn: Callable[[], T], timeout: float = WAIT_S) -> T:
    return wait(in_thread(fn), timeout)


# ---- the scripted server ----


class ScriptedGenerate:
    """The server's end of one Generate RPC."""

    def __init__(self, metadata: Any, rpc: grpc_testing.StreamStreamChannelRpc) -> None:
        self.metadata = tuple(metadata)
        self.rpc = rpc
        self.ended = False

    def request(self) -> pb.GenerateRequest:
        return bounded(self.rpc.take_request)

    def start(self) -> pb.Start:
        request = self.request()
        assert request.WhichOneof("kind") == "start", request
        return request.start

    def send(self, request_id: str, **kind: Any) -> None:
        self.rpc.send_response(pb.GenerateResponse(request_id=request_id, **kind))

    def requests_closed(self) -> None:
        """Returns once the client has half-closed."""
        bounded(self.rpc.requests_closed)

    def cancelled(self) -> None:
        """Returns once the client has cancelled the RPC."""
        bounded(self.rpc.cancelled)
        self.ended = True

    def end(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> None:
        self.rpc.terminate((), code, details)
        self.ended = True


class ScriptedServer:
    def __init__(self) -> None:
        self.channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())
        self._generates: list[ScriptedGenerate] = []

    def take_generate(self) -> ScriptedGenerate:
        metadata, rpc = bounded(lambda: self.channel.take_stream_stream(GENERATE))
        scripted = ScriptedGenerate(metadata, rpc)
        self._generates.append(scripted)
        return scripted

    def take_cancel(self) -> tuple[Any, pb.CancelRequest, grpc_testing.UnaryUnaryChannelRpc]:
        return bounded(lambda: self.channel.take_unary_unary(CANCEL))

    def close(self) -> None:
        # An RPC a failed test left open would keep the client's reader (and grpc_testing's request
        # thread, which is not a daemon) waiting: end it.
        for scripted in self._generates:
            if not scripted.ended:
                scripted.end(grpc.StatusCode.ABORTED, "the test is over")


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture
def client(server: ScriptedServer) -> Iterator[Client]:
    with Client(channel=server.channel, token=TOKEN) as client:
        yield client


def close_cleanly(stream: Stream, rpc: ScriptedGenerate) -> None:
    """Leave a stream as `with` does (half-close, wait for the end) while the server ends the RPC
    with OK; once this returns the client's reader has handled every response."""
    closing = in_thread(stream.close)
    rpc.requests_closed()
    rpc.end()
    wait(closing)


TIMINGS = pb.Timings(queue_ms=0.5, time_to_first_token_ms=12.25, total_ms=40.0, decode_tokens_per_second=50.0)


def finished(reason: int = pb.STOP_REASON_EOS, chars: int = 0, tokens: int = 0, **fields: Any) -> pb.Finished:
    return pb.Finished(reason=reason, sent_text_chars=chars, sent_tokens=tokens, **fields)


def error(code: grpc.StatusCode, message: str, field: str = "") -> pb.Error:
    return pb.Error(code=code.value[0], message=message, field=field)


# ---- the harness: an ordinary generation ----


def test_a_scripted_generation_gives_its_chunks_then_its_result(
    server: ScriptedServer, client: Client
) -> None:
    generation = client.generate("Hello", max_tokens=8, request_id="r1")
    rpc = server.take_generate()
    assert ("authorization", f"Bearer {TOKEN}") in rpc.metadata
    start = rpc.start()
    assert (start.request_id, start.prompt, start.stopping.max_tokens) == ("r1", "Hello", 8)

    rpc.send("r1", started=pb.Started(prompt_tokens=3, cached_prompt_tokens=1, seed=42, max_tokens=8))
    rpc.send("r1", chunk=pb.Chunk(text="Hello", index=0, token_ids=[7]))
    rpc.send("r1", chunk=pb.Chunk(text=", world.", index=1, segment_end=True, server_time_ms=1234))
    usage = pb.Usage(prompt_tokens=3, completion_tokens=3, cached_prompt_tokens=1)
    rpc.send("r1", finished=finished(pb.STOP_REASON_EOS, 13, 2, usage=usage, timings=TIMINGS))

    assert bounded(lambda: list(generation)) == [
        Chunk("r1", "Hello", 0, token_ids=(7,)),
        Chunk("r1", ", world.", 1, segment_end=True, server_time_ms=1234),
    ]
    assert generation.result == Result(
        reason=StopReason.EOS,
        stop_sequence="",
        usage=Usage(3, 3, 1),
        timings=Timings(0.5, 12.25, 40.0, 50.0),
        sent_text_chars=13,
        sent_tokens=2,
        tail_text="",
        request_id="r1",
        text="Hello, world.",
        seed=42,
        prompt_tokens=3,
        cached_prompt_tokens=1,
    )
    rpc.requests_closed()  # generate() half-closes once its one request has ended
    rpc.end()


def test_interrupt_on_a_stream_sends_the_mode_and_returns_the_acknowledged_stop(
    server: ScriptedServer, client: Client
) -> None:
    stream = client.stream()
    generation = stream.start("Tell me a story", request_id="story", chunking="sentence")
    rpc = server.take_generate()
    assert rpc.start().output.chunking == pb.CHUNKING_SENTENCE
    rpc.send("story", started=pb.Started(prompt_tokens=4, seed=7))
    rpc.send("story", chunk=pb.Chunk(text="Once upon a time.", index=0, segment_end=True))
    assert bounded(lambda: next(generation)).text == "Once upon a time."

    interrupting = in_thread(lambda: stream.interrupt("story", "after_segment", timeout=WAIT_S))
    request = rpc.request()
    assert request.interrupt == pb.Interrupt(request_id="story", mode=pb.INTERRUPT_MODE_AFTER_SEGMENT)
    rpc.send("story", finished=finished(pb.STOP_REASON_INTERRUPTED, 17, 5, tail_text=" There"))

    stop = wait(interrupting)
    assert (stop.reason, stop.sent_text_chars, stop.tail_text, stop.text, stop.seed) == (
        StopReason.INTERRUPTED,
        17,
        " There",
        "Once upon a time.",
        7,
    )
    assert generation.result is stop
    close_cleanly(stream, rpc)


def test_an_interrupt_of_an_id_not_live_raises_not_found(server: ScriptedServer, client: Client) -> None:
    stream = client.stream()
    generation = stream.start("Hi", request_id="live")
    rpc = server.take_generate()
    rpc.start()
    interrupting = in_thread(lambda: stream.interrupt("gone", timeout=WAIT_S))
    assert rpc.request().interrupt.request_id == "gone"
    rpc.send("gone", error=error(grpc.StatusCode.NOT_FOUND, "no live request 'gone'", "interrupt.request_id"))

    with pytest.raises(NotFound) as caught:
        wait(interrupting)
    assert (caught.value.request_id, caught.value.field, caught.value.message) == (
        "gone",
        "interrupt.request_id",
        "no live request 'gone'",
    )
    assert not generation.done  # an Error about an Interrupt never ends a generation
    rpc.send("live", finished=finished())
    assert bounded(lambda: generation.final_result(WAIT_S)).reason == StopReason.EOS
    close_cleanly(stream, rpc)
    assert stream.unclaimed_errors == []  # the NOT_FOUND was claimed by its interrupt


def test_an_interrupt_that_crosses_the_finished_returns_the_result(
    server: ScriptedServer, client: Client
) -> None:
    stream = client.stream()
    generation = stream.start("Hi", request_id="r1")
    rpc = server.take_generate()
    rpc.start()
    interrupting = in_thread(lambda: stream.interrupt("r1", timeout=WAIT_S))
    assert rpc.request().interrupt.request_id == "r1"
    # The request ended on its own just before the Interrupt arrived: Finished, then the NOT_FOUND.
    rpc.send("r1", finished=finished(pb.STOP_REASON_MAX_TOKENS, 0, 0))
    rpc.send("r1", error=error(grpc.StatusCode.NOT_FOUND, "no live request 'r1'", "interrupt.request_id"))

    assert wait(interrupting).reason == StopReason.MAX_TOKENS
    close_cleanly(stream, rpc)
    assert generation.result.reason == StopReason.MAX_TOKENS
    [unclaimed] = stream.unclaimed_errors
    assert (type(unclaimed), unclaimed.request_id, unclaimed.field) == (
        NotFound,
        "r1",
        "interrupt.request_id",
    )


def test_closing_a_generation_cancels_its_rpc(server: ScriptedServer, client: Client) -> None:
    generation = client.generate("Hi", request_id="r1")
    rpc = server.take_generate()
    rpc.start()
    rpc.send("r1", chunk=pb.Chunk(text="a", index=0))
    assert bounded(lambda: next(generation)).text == "a"

    generation.close()
    rpc.cancelled()
    with pytest.raises(Cancelled) as caught:
        bounded(lambda: next(generation))
    assert (caught.value.code, caught.value.request_id) == (grpc.StatusCode.CANCELLED, "r1")
    assert generation.done


# ---- 1. an Error for a request id the client never started ----


def test_an_error_for_an_id_never_started_is_kept_aside_and_ends_nothing(
    server: ScriptedServer, client: Client
) -> None:
    stream = client.stream()
    generation = stream.start("Hi", request_id="mine")
    rpc = server.take_generate()
    assert rpc.start().request_id == "mine"
    rpc.send("mine", started=pb.Started(prompt_tokens=1))
    rpc.send("ghost", error=error(grpc.StatusCode.INTERNAL, "ghost failed"))
    rpc.send("", error=error(grpc.StatusCode.INVALID_ARGUMENT, "kind: set start or interrupt", "kind"))
    rpc.send("mine", chunk=pb.Chunk(text="fine", index=0))
    rpc.send("mine", finished=finished(pb.STOP_REASON_EOS, 4, 1))

    assert bounded(lambda: [chunk.text for chunk in generation]) == ["fine"]
    assert (generation.result.text, generation.result.reason) == ("fine", StopReason.EOS)
    # Both Errors came before "mine"'s Finished, so the reader had handled them when it ended.
    ghost, nameless = stream.unclaimed_errors
    assert (type(ghost), ghost.code, ghost.request_id, ghost.message, ghost.field) == (
        ServerError,
        grpc.StatusCode.INTERNAL,
        "ghost",
        "ghost failed",
        "",
    )
    assert (type(nameless), nameless.code, nameless.request_id, nameless.field) == (
        InvalidArgument,
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
        "kind",
    )
    # The stream is still usable: a new generation on it runs normally.
    second = stream.start("Again", request_id="second")
    assert rpc.start().request_id == "second"
    rpc.send("second", finished=finished(pb.STOP_REASON_MAX_TOKENS))
    assert bounded(lambda: second.final_result(WAIT_S)).reason == StopReason.MAX_TOKENS
    close_cleanly(stream, rpc)
    assert len(stream.unclaimed_errors) == 2


# ---- 2. the stream ends (OK) without a started request's Finished ----


def test_a_stream_that_ends_ok_without_finished_fails_the_request(
    server: ScriptedServer, client: Client
) -> None:
    generation = client.generate("Hi", request_id="r1")
    rpc = server.take_generate()
    rpc.start()
    rpc.send("r1", started=pb.Started(prompt_tokens=2))
    rpc.send("r1", chunk=pb.Chunk(text="Hal", index=0))
    rpc.end()  # OK, but "r1" never got its Finished

    assert bounded(lambda: next(generation)).text == "Hal"
    with pytest.raises(ServerError) as caught:
        bounded(lambda: next(generation))
    failure = caught.value
    assert type(failure) is ServerError
    assert (failure.code, failure.request_id, failure.message) == (
        grpc.StatusCode.INTERNAL,
        "r1",
        "the stream ended before the request finished",
    )
    assert generation.done
    with pytest.raises(ServerError, match="ended before the request finished"):
        generation.final_result(0)
    assert list(generation) == []  # the failure was the last item: iterating again just ends


def test_a_stream_that_ends_ok_fails_each_live_request_and_waiting_interrupt(
    server: ScriptedServer, client: Client
) -> None:
    stream = client.stream()
    done = stream.start("A", request_id="a")
    live = stream.start("B", request_id="b")
    rpc = server.take_generate()
    assert [rpc.start().request_id, rpc.start().request_id] == ["a", "b"]
    rpc.send("a", chunk=pb.Chunk(text="x", index=0))
    rpc.send("a", finished=finished(pb.STOP_REASON_EOS, 1, 1))
    assert bounded(lambda: done.final_result(WAIT_S)).text == "x"
    interrupting = in_thread(lambda: stream.interrupt("zombie", timeout=WAIT_S))
    assert rpc.request().interrupt.request_id == "zombie"
    rpc.end()  # neither "b" nor the interrupt got an answer

    with pytest.raises(ServerError) as caught:
        bounded(lambda: live.final_result(WAIT_S))
    assert (type(caught.value), caught.value.request_id) == (ServerError, "b")
    with pytest.raises(ServerError, match="ended before the request finished"):
        wait(interrupting)
    assert done.result.text == "x"  # a request that had finished keeps its Result
    with pytest.raises(RuntimeError, match="the stream is closed"):
        stream.start("C", request_id="c")
    bounded(stream.close)  # returns at once: the RPC is over


# ---- 3. messages after a request's last one ----


def test_messages_after_a_requests_finished_change_nothing(
    server: ScriptedServer, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenwire.client")
    stream = client.stream()
    first = stream.start("A", request_id="r1")
    other = stream.start("B", request_id="other")
    rpc = server.take_generate()
    rpc.start()
    rpc.start()
    rpc.send("r1", chunk=pb.Chunk(text="one", index=0))
    rpc.send("r1", finished=finished(pb.STOP_REASON_EOS, 3, 1))
    # A broken server keeps talking about "r1".
    rpc.send("r1", chunk=pb.Chunk(text="two", index=1))
    rpc.send("r1", started=pb.Started(prompt_tokens=99))
    rpc.send("r1", finished=finished(pb.STOP_REASON_MAX_TOKENS, 6, 2))
    rpc.send("r1", error=error(grpc.StatusCode.INTERNAL, "too late"))
    # The reader must survive all that: "other", still live, is served after it.
    rpc.send("other", chunk=pb.Chunk(text="b", index=0))
    rpc.send("other", finished=finished(pb.STOP_REASON_EOS, 1, 1))
    close_cleanly(stream, rpc)  # the reader has now handled every response

    assert bounded(lambda: [chunk.text for chunk in first]) == ["one"]
    result = first.result
    assert (result.reason, result.text, result.sent_text_chars, result.sent_tokens, result.prompt_tokens) == (
        StopReason.EOS,
        "one",
        3,
        1,
        0,
    )
    assert bounded(lambda: [chunk.text for chunk in other]) == ["b"]
    assert other.result.reason == StopReason.EOS
    [late] = stream.unclaimed_errors
    assert (type(late), late.request_id, late.message) == (ServerError, "r1", "too late")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_chunk_after_finished_on_generate_is_dropped(server: ScriptedServer, client: Client) -> None:
    generation = client.generate("Hi", request_id="r1")
    rpc = server.take_generate()
    rpc.start()
    rpc.send("r1", chunk=pb.Chunk(text="one", index=0))
    rpc.send("r1", finished=finished(pb.STOP_REASON_EOS, 3, 1))
    rpc.requests_closed()  # the Finished was handled: generate() half-closes after its request
    rpc.send("r1", chunk=pb.Chunk(text="two", index=1))
    rpc.send("r1", finished=finished(pb.STOP_REASON_ERROR, 6, 2))
    rpc.end()

    assert bounded(lambda: [chunk.text for chunk in generation]) == ["one"]
    assert (generation.result.reason, generation.result.text) == (StopReason.EOS, "one")
    assert generation.final_result(0) is generation.result


# ---- 4. UNAVAILABLE mid-stream ----


def test_unavailable_mid_stream_raises_unavailable_with_the_status(
    server: ScriptedServer, client: Client
) -> None:
    generation = client.generate("Hi", request_id="r1")
    rpc = server.take_generate()
    rpc.start()
    rpc.send("r1", started=pb.Started(prompt_tokens=2))
    rpc.send("r1", chunk=pb.Chunk(text="Hel", index=0))
    # Read before the failure: grpc_testing drops responses not yet read when an RPC fails.
    assert bounded(lambda: next(generation)).text == "Hel"
    rpc.end(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")

    with pytest.raises(Unavailable) as caught:
        bounded(lambda: next(generation))
    failure = caught.value
    assert isinstance(failure, ConnectionError)
    assert (failure.code, failure.message, failure.request_id) == (
        grpc.StatusCode.UNAVAILABLE,
        "connection reset by peer",
        "r1",
    )
    with pytest.raises(Unavailable, match="connection reset by peer"):
        generation.final_result(0)


def test_unavailable_on_a_stream_fails_live_requests_and_keeps_finished_ones(
    server: ScriptedServer, client: Client
) -> None:
    stream = client.stream()
    done = stream.start("A", request_id="a")
    live = stream.start("B", request_id="b")
    rpc = server.take_generate()
    rpc.start()
    rpc.start()
    rpc.send("a", finished=finished(pb.STOP_REASON_EOS))
    assert bounded(lambda: done.final_result(WAIT_S)).reason == StopReason.EOS
    rpc.end(grpc.StatusCode.UNAVAILABLE, "server shutting down")

    with pytest.raises(Unavailable) as caught:
        bounded(lambda: live.final_result(WAIT_S))
    assert (caught.value.code, caught.value.request_id) == (grpc.StatusCode.UNAVAILABLE, "b")
    assert done.result.reason == StopReason.EOS
    with pytest.raises(Unavailable, match="server shutting down"):
        stream.start("C", request_id="c")  # the stream's failure, not a new RPC
    bounded(stream.close)


# ---- unary Cancel ----


SUMMARY = finished(
    pb.STOP_REASON_CANCELLED,
    5,
    2,
    usage=pb.Usage(prompt_tokens=4, completion_tokens=2),
    timings=TIMINGS,
    tail_text="..",
)


def test_cancel_sends_the_id_token_and_replica_and_converts_the_summary(
    server: ScriptedServer, client: Client
) -> None:
    calling = in_thread(lambda: client.cancel("r1", replica="replica-2"))
    metadata, request, rpc = server.take_cancel()
    assert request == pb.CancelRequest(request_id="r1")
    assert {("authorization", f"Bearer {TOKEN}"), ("x-tokenwire-replica", "replica-2")} <= set(metadata)
    rpc.terminate(pb.CancelResponse(found=True, summary=SUMMARY), (), grpc.StatusCode.OK, "")

    assert wait(calling) == CancelResult(
        found=True,
        summary=Summary(
            reason=StopReason.CANCELLED,
            stop_sequence="",
            usage=Usage(4, 2, 0),
            timings=Timings(0.5, 12.25, 40.0, 50.0),
            sent_text_chars=5,
            sent_tokens=2,
            tail_text="..",
        ),
    )


def test_cancel_of_an_unknown_id_is_found_false(server: ScriptedServer, client: Client) -> None:
    calling = in_thread(lambda: client.cancel("nobody"))
    metadata, request, rpc = server.take_cancel()
    assert request.request_id == "nobody"
    assert "x-tokenwire-replica" not in dict(metadata)
    rpc.terminate(pb.CancelResponse(found=False), (), grpc.StatusCode.OK, "")
    assert wait(calling) == CancelResult(found=False, summary=None)


def test_cancel_retries_unavailable_within_connect_timeout(server: ScriptedServer, client: Client) -> None:
    calling = in_thread(lambda: client.cancel("r1"))
    _, request, rpc = server.take_cancel()
    rpc.terminate(pb.CancelResponse(), (), grpc.StatusCode.UNAVAILABLE, "still loading")
    _, again, rpc = server.take_cancel()  # the retry, after the client's backoff
    assert again == request
    rpc.terminate(pb.CancelResponse(found=True), (), grpc.StatusCode.OK, "")
    assert wait(calling) == CancelResult(found=True, summary=None)


def test_cancel_raises_unavailable_once_connect_timeout_is_spent(server: ScriptedServer) -> None:
    with Client(channel=server.channel, connect_timeout=0) as client:
        calling = in_thread(lambda: client.cancel("r1"))
        _, _, rpc = server.take_cancel()
        rpc.terminate(pb.CancelResponse(), (), grpc.StatusCode.UNAVAILABLE, "still loading")
        with pytest.raises(Unavailable) as caught:
            wait(calling)
    assert (caught.value.code, caught.value.message) == (grpc.StatusCode.UNAVAILABLE, "still loading")


def test_cancel_does_not_retry_a_refusal(server: ScriptedServer, client: Client) -> None:
    calling = in_thread(lambda: client.cancel(""))
    _, _, rpc = server.take_cancel()
    rpc.terminate(pb.CancelResponse(), (), grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
    with pytest.raises(InvalidArgument) as caught:
        wait(calling)  # raised after one attempt: a retry would wait for a second take_cancel
    assert (caught.value.code, caught.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id")


# ---- the channel argument ----


def test_a_channel_passed_in_stays_open_and_refuses_tls_settings(server: ScriptedServer) -> None:
    channel = mock.Mock(wraps=server.channel)
    with Client(channel=channel):
        pass
    channel.close.assert_not_called()
    with pytest.raises(ValueError, match="a channel the client opens"):
        Client(channel=server.channel, tls=True)

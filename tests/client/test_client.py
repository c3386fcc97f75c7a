"""tokenwire.client against a real server over real sockets: every method of AsyncClient and Client,
every error class raised in a real situation, multiplexing and interrupts, TLS and tokens, no torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from tests.conftest import free_port, running_server, wait_until_idle
from tests.fake_runner import FakeRunner, token_id
from tests.waiting import until
from tokenwire.client import (
    AlreadyExists,
    AsyncClient,
    Cancelled,
    Chunk,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    HealthStatus,
    InterruptMode,
    InvalidArgument,
    Message,
    NotFound,
    ResourceExhausted,
    Result,
    ServerError,
    StopReason,
    TokenWireError,
    Unauthenticated,
    Unavailable,
)
from tokenwire.client._convert import build_start, summary_from_pb
from tokenwire.client._errors import error_for
from tokenwire.service.engine.engine import EngineConfig
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb

# After " hello" the fake runner (greedy or not) says " cat sat. on mat, Dr Smith hello world the ...".
LONG = 200  # max_tokens for a generation that runs until interrupted
# Scripted for sentence chunking: the unscripted words have no sentence boundary the segmenter accepts.
SENTENCES = "Ġhello Ġworld . ĠDr ĠSmith Ġsat . ĠDr ĠSmith Ġsat Ġon Ġthe Ġmat ."


def words(text: str) -> list[int]:
    return [token_id(word) for word in text.split()]


@pytest.fixture
async def client(served: RunningServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(served.address, timeout=5) as client:
        yield client


def fake(server: RunningServer) -> FakeRunner:
    assert server.engine is not None
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)
    return runner


async def idle(server: RunningServer) -> None:
    assert server.engine is not None
    await wait_until_idle(server.engine)


# ---- pure conversions: options to a Start, statuses to exceptions ----


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {}),
        ({"temperature": 0.0, "seed": 7}, {"sampling": {"temperature": 0.0, "seed": "7"}}),
        ({"max_tokens": 3, "stop": "."}, {"stopping": {"maxTokens": 3, "stop": ["."]}}),
        ({"stop": ["a", "b"], "ignore_eos": True}, {"stopping": {"stop": ["a", "b"], "ignoreEos": True}}),
        (
            {"chunking": "clause", "top_logprobs": 2},
            {"output": {"chunking": "CHUNKING_CLAUSE", "topLogprobs": 2}},
        ),
        ({"include_token_ids": True}, {"output": {"tokenIds": True}}),
        (
            {"session_id": "s", "truncate_reply_chars": 0},
            {"sessionId": "s", "truncateSession": {"replyChars": 0}},
        ),
        ({"max_tokens": None, "chunking": None, "logprobs": False}, {}),  # None and False: server defaults
    ],
)
def test_options_map_onto_the_start_message(options: Any, expected: dict[str, Any]) -> None:
    start = json_format.MessageToDict(build_start("r", "hi", options))
    assert start == {"requestId": "r", "prompt": "hi", **expected}


def test_the_input_is_a_prompt_messages_or_token_ids() -> None:
    chat = build_start("r", None, {"messages": [("user", "hi"), {"role": "assistant", "content": "yo"}]})
    assert [(m.role, m.content) for m in chat.chat.messages] == [("user", "hi"), ("assistant", "yo")]
    assert list(build_start("r", None, {"token_ids": [5, 6]}).token_ids.ids) == [5, 6]
    for prompt, options in ((None, {}), ("hi", {"token_ids": [1]})):
        with pytest.raises(InvalidArgument, match="exactly one"):
            build_start("r", prompt, options)  # type: ignore[arg-type]


S = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "message", "cls", "field"),
    [
        (
            S.INVALID_ARGUMENT,
            "start.sampling.top_p: must be in (0, 1]",
            InvalidArgument,
            "start.sampling.top_p",
        ),
        (S.OUT_OF_RANGE, "request_id: required", InvalidArgument, "request_id"),
        (S.UNAVAILABLE, "the model is still loading", Unavailable, ""),
        (S.NOT_FOUND, "interrupt.request_id: no live request 'x'", NotFound, "interrupt.request_id"),
        (S.PERMISSION_DENIED, "no", Unauthenticated, ""),
        (S.DEADLINE_EXCEEDED, "Deadline Exceeded", DeadlineExceeded, ""),
        (S.UNIMPLEMENTED, "Method not found!", ServerError, ""),
        (S.DATA_LOSS, "Note: something", ServerError, ""),  # not a field path: no field
    ],
)
def test_status_codes_map_onto_the_exception_tree(
    code: grpc.StatusCode, message: str, cls: type[TokenWireError], field: str
) -> None:
    error = error_for(code, message)
    assert type(error) is cls and error.code == code and error.field == field and str(error) == message


# ---- AsyncClient: generate, complete ----


async def test_generate_streams_typed_chunks_then_a_result(
    served: RunningServer, client: AsyncClient
) -> None:
    generation = client.generate(
        " hello", max_tokens=6, chunking="word", include_token_ids=True, logprobs=True
    )
    chunks = [chunk async for chunk in generation]
    result = generation.result
    assert chunks and all(isinstance(c, Chunk) and c.request_id == generation.request_id for c in chunks)
    assert [c.index for c in chunks] == sorted(c.index for c in chunks)
    assert sum(len(c.token_ids) for c in chunks) == 6 == sum(len(c.logprobs) for c in chunks)
    assert (
        isinstance(result, Result)
        and result.reason is StopReason.MAX_TOKENS
        and result.reason == "max_tokens"
    )
    assert result.text == "".join(c.text for c in chunks) and result.sent_text_chars == len(result.text)
    assert result.usage.completion_tokens == 6 and result.prompt_tokens == result.usage.prompt_tokens == 1
    assert result.seed is not None and result.request_id == generation.request_id
    assert result.timings.total_ms >= result.timings.time_to_first_token_ms > 0
    assert [c async for c in generation] == []  # exhausted: iterating again yields nothing
    await idle(served)


async def test_complete_stop_string_messages_and_text_stream(client: AsyncClient) -> None:
    result = await client.complete(" hello", max_tokens=20, stop="mat", request_id="mine")
    assert result.request_id == "mine" and result.reason is StopReason.STOP_SEQUENCE
    assert result.stop_sequence == "mat" and result.text == " cat sat. on "
    replay = await client.complete(messages=[Message("user", " the")], max_tokens=3, seed=result.seed)
    also = await client.complete(messages=[{"role": "user", "content": " the"}], max_tokens=3)
    assert replay.text == also.text and replay.prompt_tokens == 2  # BOS + " the" through the chat template
    by_ids = client.generate(token_ids=[token_id("Ġhello")], max_tokens=2)
    assert "".join([text async for text in by_ids.text_stream]) == " cat sat"


async def test_final_result_and_raw_responses(client: AsyncClient) -> None:
    generation = client.generate(" hello", max_tokens=3)
    result = await generation.final_result()  # without iterating: the chunks stay queued
    assert result.usage.completion_tokens == 3
    kinds = [response.WhichOneof("kind") async for response in generation.responses()]
    assert kinds == ["started", "chunk", "chunk", "chunk", "finished"]
    with pytest.raises(RuntimeError, match="not finished"):
        _ = client.generate(" hello", max_tokens=1).result


async def test_leaving_the_block_early_stops_the_generation(
    served: RunningServer, client: AsyncClient
) -> None:
    async with client.generate(" hello", max_tokens=LONG) as generation:
        async for _chunk in generation:
            break
    await idle(served)  # the RPC was cancelled: nothing left running


# ---- AsyncClient: a multiplexed stream ----


async def test_stream_runs_two_and_interrupts_one(served: RunningServer, client: AsyncClient) -> None:
    async with client.stream() as stream:
        long = await stream.start(" hello", max_tokens=LONG, request_id="long")
        short = await stream.start(" the", max_tokens=5, request_id="short")
        first = await anext(long)
        stopped = await stream.interrupt("long")
        assert stopped.reason is StopReason.INTERRUPTED and stopped.request_id == "long"
        rest = [chunk.text async for chunk in long]  # what was already on its way before the stop
        assert first.text + "".join(rest) == stopped.text and stopped.sent_text_chars == len(stopped.text)
        assert stopped.usage.completion_tokens < LONG
        finished = await short.final_result()
        assert finished.reason is StopReason.MAX_TOKENS and finished.usage.completion_tokens == 5
    assert long.result is stopped and short.done
    await idle(served)


async def test_interrupt_after_segment_finishes_the_sentence(
    served: RunningServer, client: AsyncClient
) -> None:
    fake(served).script[token_id("ĠSmith")] = words(SENTENCES) * 10
    async with client.stream() as stream:
        generation = await stream.start(" Smith", max_tokens=LONG, chunking="sentence")
        first = await anext(generation)
        result = await generation.interrupt(InterruptMode.AFTER_SEGMENT)
        rest = [chunk async for chunk in generation]
    assert first.text == " hello world." and first.segment_end
    assert result.reason is StopReason.INTERRUPTED and result.usage.completion_tokens < LONG
    assert all(chunk.segment_end for chunk in rest) and result.text.endswith(".")
    assert result.sent_text_chars == len(result.text)  # tail_text may hold the lookahead past the "."


async def test_half_close_lets_running_generations_finish(client: AsyncClient) -> None:
    async with client.stream() as stream:
        generation = await stream.start(" hello", max_tokens=10)
    # Leaving the block half-closed and waited: the generation ran to its end.
    assert generation.result.reason is StopReason.MAX_TOKENS
    with pytest.raises(RuntimeError, match="closed"):
        await stream.start(" hello")


# ---- AsyncClient: unary calls ----


async def test_cancel_from_another_connection(served: RunningServer, client: AsyncClient) -> None:
    generation = client.generate(" hello", max_tokens=LONG, request_id="to-cancel")
    await anext(generation)
    async with AsyncClient(served.address) as other:
        answer = await other.cancel("to-cancel")
        assert answer.found and answer.summary is not None
        assert answer.summary.reason is StopReason.CANCELLED
        assert (await other.cancel("to-cancel")).found is False  # idempotent
    result = await generation.final_result()
    assert result.reason is StopReason.CANCELLED
    assert result.sent_text_chars == answer.summary.sent_text_chars


def test_every_stop_reason_of_the_contract_has_its_own_name() -> None:
    for value in pb.StopReason.values():
        reason = summary_from_pb(pb.Finished(reason=value)).reason
        assert reason == pb.StopReason.Name(value).removeprefix("STOP_REASON_").lower()
    assert summary_from_pb(pb.Finished(reason=pb.STOP_REASON_SHUTDOWN)).reason is StopReason.SHUTDOWN


async def test_a_generation_the_servers_drain_cuts_short_ends_with_shutdown() -> None:
    async with running_server(step_delay=0.01) as server, AsyncClient(server.address) as client:
        generation = client.generate(" hello", max_tokens=LONG)
        await anext(generation)
        await server.stop(grace_s=0.1)
        result = await generation.final_result()
    assert result.reason is StopReason.SHUTDOWN and result.usage.completion_tokens < LONG
    assert result.sent_text_chars == len(result.text)


async def test_cancel_with_the_replica_header_for_the_proxy() -> None:
    """A server behind a proxy names its replica on Generate; cancel(replica=...) sends it back as the
    header the proxy routes on (the server itself ignores it)."""
    from tokenwire.client._channel import replica_metadata

    assert replica_metadata("r1") == (("x-tokenwire-replica", "r1"),) and replica_metadata(None) == ()
    async with running_server(replica_id="r1") as server, AsyncClient(server.address) as client:
        generation = client.generate(" hello", max_tokens=LONG)
        await anext(generation)
        answer = await client.cancel(generation.request_id, replica="r1")
        assert answer.found and (await generation.final_result()).reason is StopReason.CANCELLED


async def test_model_info_tokenize_health(client: AsyncClient) -> None:
    info = await client.model_info()
    assert info.model == "fake" and info.vocab_size == 15 and info.eos_token_ids == (1,)
    assert info.weights == "dense" and info.activations == "" and info.kv_cache_dtype == "none"
    assert info.context_length == 256 and info.has_chat_template
    tokens = await client.tokenize(" hello world")
    assert tokens.ids == (token_id("Ġhello"), token_id("Ġworld")) and tokens.tokens == (" hello", " world")
    chat = await client.tokenize(messages=[("user", " hello")])
    assert chat.ids == (FakeRunner.bos_token_id, token_id("Ġhello")) and len(chat) == 2
    assert await client.health() is HealthStatus.SERVING
    assert await client.health("tokenwire.v1.TokenWire") == "serving"


# ---- errors, each in a real situation ----


async def test_invalid_argument_names_the_field(client: AsyncClient) -> None:
    generation = client.generate(" hello", top_p=2.0)  # from an Error message on the stream
    with pytest.raises(InvalidArgument) as caught:
        await anext(generation)
    error = caught.value
    assert error.field == "start.sampling.top_p" and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.request_id == generation.request_id and isinstance(error, ValueError)
    with pytest.raises(InvalidArgument) as caught:  # from an RPC status: the field parsed from the details
        await client.tokenize(messages=[])
    assert caught.value.field == "chat.messages"
    with pytest.raises(InvalidArgument, match="exactly one"):  # checked before sending anything
        client.generate(" hello", token_ids=[1])
    with pytest.raises(TypeError, match="max_token"):
        client.generate(" hello", max_token=3)  # type: ignore[call-arg]


async def test_not_found_for_an_interrupt_of_an_unknown_id(client: AsyncClient) -> None:
    async with client.stream() as stream:
        with pytest.raises(NotFound) as caught:
            await stream.interrupt("nobody")
        assert caught.value.field == "interrupt.request_id" and caught.value.request_id == "nobody"
        done = await stream.start(" hello", max_tokens=1)
        result = await done.final_result()
        with pytest.raises(NotFound):  # no longer live: the server answers NOT_FOUND
            await stream.interrupt(done.request_id)
        assert await done.interrupt() is result  # the handle knows it has ended


async def test_already_exists_across_connections_and_on_one_stream(client: AsyncClient) -> None:
    async with client.stream() as stream:
        await stream.start(" hello", max_tokens=LONG, request_id="twin")
        with pytest.raises(AlreadyExists):  # one stream cannot route two live requests with one id
            await stream.start(" hello", request_id="twin")
        with pytest.raises(AlreadyExists) as caught:  # another connection: the server refuses it
            await client.complete(" hello", request_id="twin")
        assert caught.value.field == "start.request_id"
        await stream.interrupt("twin")


async def test_failed_precondition_when_a_session_is_busy(client: AsyncClient) -> None:
    async with client.stream() as stream:
        await stream.start(" hello", max_tokens=LONG, session_id="s", request_id="first")
        second = await stream.start(" hello", session_id="s")
        with pytest.raises(FailedPrecondition) as caught:
            await second.final_result()
        assert caught.value.field == "start.session_id"
        await stream.interrupt("first")


async def test_resource_exhausted_at_the_live_request_limit() -> None:
    async with (
        running_server(EngineConfig(max_batch_size=4, max_live_requests=1)) as server,
        AsyncClient(server.address) as client,
        client.stream() as stream,
    ):
        await stream.start(" hello", max_tokens=LONG, request_id="only")
        with pytest.raises(ResourceExhausted):
            await client.complete(" hello", max_tokens=1)
        await stream.interrupt("only")


async def test_unavailable_on_a_closed_port() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, connect_timeout=0.3) as client:
        with pytest.raises(Unavailable) as caught:
            await client.model_info()
        assert isinstance(caught.value, ConnectionError) and caught.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            await client.complete(" hello")
    with Client(address, connect_timeout=0.3) as sync, pytest.raises(Unavailable, match="could not connect"):
        sync.generate(" hello")


async def test_a_connect_timeout_says_why_the_last_attempt_failed() -> None:
    address = f"127.0.0.1:{free_port()}"
    async with AsyncClient(address, connect_timeout=0.3) as client:
        with pytest.raises(Unavailable, match=r"within 0.3 s: connection refused$"):
            await client.model_info()
    with Client(address, connect_timeout=0.3) as sync, pytest.raises(Unavailable) as caught:
        sync.health()
    assert str(caught.value) == f"could not connect to {address} within 0.3 s: connection refused"


async def test_without_wait_for_server_the_first_failed_attempt_says_why() -> None:
    # A connect timeout that is never reached: the first refusal ends the wait, saying so (not
    # "within 30 s"), as does an address that cannot work.
    address = f"127.0.0.1:{free_port()}"
    refused = f"could not connect to {address}: connection refused"
    async with AsyncClient(address, connect_timeout=30, wait_for_server=False) as client:
        with pytest.raises(Unavailable) as caught:
            await client.model_info()
        assert str(caught.value) == refused
        with pytest.raises(Unavailable) as caught:
            await client.complete(" hello")
        assert str(caught.value) == refused
    with Client(address, connect_timeout=30, wait_for_server=False) as sync:
        for call in (sync.model_info, lambda: sync.generate(" hello")):
            with pytest.raises(Unavailable) as caught:
                call()
            assert str(caught.value) == refused
    with Client("127.0.0.1:port", connect_timeout=30, wait_for_server=False) as sync:
        with pytest.raises(InvalidArgument, match=r"invalid address '127\.0\.0\.1:port'") as invalid:
            sync.health()
        assert invalid.value.field == "address"


async def test_without_wait_for_server_a_server_that_answers_is_used(served: RunningServer) -> None:
    async with AsyncClient(served.address, wait_for_server=False) as client:
        assert (await client.model_info()).model == "fake"

    def blocking() -> str:  # in a thread: the server runs on this test's event loop
        with Client(served.address, wait_for_server=False) as sync:
            return sync.complete(" hello", max_tokens=2).text

    assert await asyncio.to_thread(blocking) == " cat sat"


async def test_connecting_waits_for_a_server_that_starts_late() -> None:
    port = free_port()
    async with AsyncClient(f"127.0.0.1:{port}", connect_timeout=10) as client:
        info = asyncio.create_task(client.model_info())

        def an_attempt_failed() -> bool:  # the client's channel (private) says so: nobody listens yet
            channel = client._channel
            return channel is not None and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE

        await until(an_attempt_failed, timeout=10, what="a connection attempt failed")
        assert not info.done()  # still waiting: the call retries while connecting
        async with running_server(port=port):
            assert (await asyncio.wait_for(info, 10)).model == "fake"


async def test_deadline_exceeded_and_cancelled(served: RunningServer, client: AsyncClient) -> None:
    fake(served).step_delay = 0.02
    with pytest.raises(DeadlineExceeded) as caught:
        await client.complete(" hello", max_tokens=LONG, timeout=0.2)
    assert isinstance(caught.value, TimeoutError)
    stream = client.stream()
    generation = await stream.start(" hello", max_tokens=LONG)
    await anext(generation)
    stream.cancel()  # cancels the RPC: the server stops the generation
    with pytest.raises(Cancelled):
        await generation.final_result()
    await idle(served)


async def test_server_error_from_a_server_without_the_service() -> None:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            assert await client.health() is HealthStatus.SERVING
            with pytest.raises(ServerError) as caught:
                await client.model_info()
            assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


async def test_bearer_token_and_unauthenticated() -> None:
    async with running_server(auth_token="s3cret") as server:
        async with AsyncClient(server.address) as anonymous:
            assert await anonymous.health() is HealthStatus.SERVING  # health stays open
            with pytest.raises(Unauthenticated):
                await anonymous.model_info()
            with pytest.raises(Unauthenticated) as caught:
                await anonymous.complete(" hello", max_tokens=1)
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncClient(server.address, token="wrong") as wrong:
            with pytest.raises(Unauthenticated):
                await wrong.cancel("x")
        async with AsyncClient(server.address, token="s3cret") as client:
            assert (await client.complete(" hello", max_tokens=2)).usage.completion_tokens == 2
            assert (await client.cancel("x")).found is False


def test_every_error_is_a_tokenwire_error() -> None:
    classes = [Unavailable, InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted]
    classes += [Unauthenticated, DeadlineExceeded, Cancelled, ServerError]
    assert all(issubclass(cls, TokenWireError) for cls in classes)


# ---- TLS ----


async def test_mutual_tls(certs: Path) -> None:
    tls: dict[str, Any] = {
        "tls_cert": str(certs / "server.pem"),
        "tls_key": str(certs / "server.key"),
        "tls_client_ca": str(certs / "ca.pem"),
    }
    async with running_server(**tls) as server:
        mine: dict[str, Any] = {"client_cert": certs / "client.pem", "client_key": certs / "client.key"}
        async with AsyncClient(server.address, ca_file=certs / "ca.pem", **mine) as client:
            assert (await client.complete(" hello", max_tokens=2)).usage.completion_tokens == 2

        def sync() -> None:
            with Client(server.address, ca_file=certs / "ca.pem", **mine) as client:
                assert client.model_info().model == "fake"
            no_cert = Client(server.address, ca_file=certs / "ca.pem", connect_timeout=0.5)
            with no_cert, pytest.raises(Unavailable):  # the handshake fails without a client certificate
                no_cert.model_info()

        await asyncio.to_thread(sync)


# ---- the blocking Client (run in a thread: the server lives on this test's event loop) ----


async def test_sync_client_every_method(served: RunningServer) -> None:
    def run() -> None:
        with Client(served.address, timeout=5) as client:
            generation = client.generate(" hello", max_tokens=4, chunking="word")
            chunks = list(generation)
            assert "".join(c.text for c in chunks) == generation.result.text == " cat sat. on"
            assert client.complete(" hello", max_tokens=2).text == " cat sat"
            raw = client.generate(" hello", max_tokens=1)
            assert [r.WhichOneof("kind") for r in raw.responses()] == ["started", "chunk", "finished"]
            assert "".join(client.generate(" hello", max_tokens=2).text_stream) == " cat sat"

            with client.stream() as stream:
                long = stream.start(" hello", max_tokens=LONG, request_id="sync-long")
                short = stream.start(" the", max_tokens=3)
                next(long)
                stopped = long.interrupt()
                assert stopped.reason is StopReason.INTERRUPTED
                assert short.final_result(timeout=5).reason is StopReason.MAX_TOKENS
                with pytest.raises(NotFound):
                    stream.interrupt("nobody", timeout=5)

            cancelled = client.generate(" hello", max_tokens=LONG, request_id="sync-cancel")
            next(cancelled)
            answer = client.cancel("sync-cancel")
            assert answer.found and cancelled.final_result(timeout=5).reason is StopReason.CANCELLED
            assert client.model_info().model == "fake"
            assert client.tokenize(" hello").ids == (token_id("Ġhello"),)
            assert client.health() is HealthStatus.SERVING
            with pytest.raises(InvalidArgument) as caught:
                list(client.generate(" hello", temperature=-1.0))
            assert caught.value.field == "start.sampling.temperature"

    await asyncio.to_thread(run)
    await idle(served)


async def test_sync_close_cancels_and_frees_the_server(served: RunningServer) -> None:
    def run() -> None:
        with Client(served.address) as client, client.generate(" hello", max_tokens=LONG) as generation:
            next(generation)
        with pytest.raises(Cancelled):
            generation.final_result(timeout=5)

    await asyncio.to_thread(run)
    await idle(served)


# ---- a light import ----


def test_import_never_loads_torch_or_transformers() -> None:
    heavy = "{'torch', 'transformers'}"
    code = f"import sys, tokenwire.client, tokenwire.client.cli; assert not {heavy} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

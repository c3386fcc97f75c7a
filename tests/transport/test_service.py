"""The service over real sockets: multiplexing, interrupts, every cancellation path, limits, health,
reflection, auth, TLS, metrics and drain — a real grpc.aio server with the fake runner behind it."""

from __future__ import annotations

import asyncio
import logging
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import FAKE_ENGINE, free_port, running_server, wait_until_idle
from tests.fake_runner import EOS, FakeRunner, ForwardGate, token_id
from tests.reliability.contract import check_chunk_tokens, read_first_chunk, read_rest, read_until_done
from tests.waiting import until
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import Failure, Finished, GenerationRequest, StopReason
from tokenwire.service.main import build_parser, configs_from_args
from tokenwire.service.transport.server import RunningServer, ServerConfig, serve, server_options
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc


def start(
    request_id: str, max_tokens: int | None = 20, prompt: str = " hello world", **fields: object
) -> pb.GenerateRequest:
    stopping = fields.pop("stopping", pb.StoppingParams(max_tokens=max_tokens))
    return pb.GenerateRequest(
        start=pb.Start(request_id=request_id, prompt=prompt, stopping=stopping, **fields)
    )  # type: ignore[arg-type]


def interrupt(request_id: str, mode: int = pb.INTERRUPT_MODE_IMMEDIATE) -> pb.GenerateRequest:
    return pb.GenerateRequest(interrupt=pb.Interrupt(request_id=request_id, mode=mode))  # type: ignore[arg-type]


def of(responses: Sequence[pb.GenerateResponse], request_id: str) -> list[pb.GenerateResponse]:
    return [r for r in responses if r.request_id == request_id]


def text_of(responses: Sequence[pb.GenerateResponse]) -> str:
    return "".join(r.chunk.text for r in responses if r.WhichOneof("kind") == "chunk")


def check_lifecycle(responses: list[pb.GenerateResponse]) -> pb.Finished:
    """Started, Chunk*, exactly one Finished at the end; what Finished says was sent was sent."""
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds[0] == "started" and kinds[-1] == "finished", kinds
    assert set(kinds[1:-1]) <= {"chunk"}, kinds
    finished = responses[-1].finished
    chunks = [r.chunk for r in responses[1:-1]]
    assert finished.sent_text_chars == len(text_of(responses))
    indexes = [c.index for c in chunks]
    assert indexes == sorted(indexes) and (not chunks or chunks[0].index == 0)
    return finished


@pytest.fixture
async def stub(served: RunningServer) -> AsyncIterator[pb_grpc.TokenWireStub]:
    async with grpc.aio.insecure_channel(served.address) as channel:
        yield pb_grpc.TokenWireStub(channel)


def fake(server: RunningServer) -> FakeRunner:
    assert server.engine is not None
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)
    return runner


def after_each_step(engine: Engine, observer: Callable[[float, int], None]) -> None:
    """Call `observer` after the server's own step hook (metrics), on the step thread."""
    server_hook = engine.on_step

    def both(seconds: float, batch: int) -> None:
        if server_hook is not None:
            server_hook(seconds, batch)
        observer(seconds, batch)

    engine.on_step = both


def after_each_finish(
    engine: Engine, observer: Callable[[GenerationRequest, Finished | Failure], None]
) -> None:
    """Call `observer` after the server's own finish hook (log line, metrics), on the step thread."""
    server_hook = engine.on_finish

    def both(request: GenerationRequest, result: Finished | Failure) -> None:
        if server_hook is not None:
            server_hook(request, result)
        observer(request, result)

    engine.on_finish = both


# ---- Generate ----


async def test_two_requests_multiplexed_on_one_stream(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    call = stub.Generate()
    await call.write(start("a", 30))
    await call.write(start("b", 30, output=pb.OutputOptions(token_ids=True)))
    await call.done_writing()
    responses = await read_rest(call)
    assert await call.code() == grpc.StatusCode.OK
    a, b = of(responses, "a"), of(responses, "b")
    assert len(a) + len(b) == len(responses)
    for finished in (check_lifecycle(a), check_lifecycle(b)):
        assert finished.reason == pb.STOP_REASON_MAX_TOKENS and finished.usage.completion_tokens == 30
    # Interleaved: each request has chunks both before and after some chunk of the other.
    order = [r.request_id for r in responses if r.WhichOneof("kind") == "chunk"]
    first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert first_b < last_a, order
    # Token ids only where asked for, and they cover every token.
    assert all(not r.chunk.token_ids for r in a if r.HasField("chunk"))
    assert sum(len(r.chunk.token_ids) for r in b if r.HasField("chunk")) == 30
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


async def test_every_chunking_gives_each_token_to_the_chunk_its_text_starts_in(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    runner = fake(served)
    first, stray = token_id("Ġworld"), token_id("µ")
    # " cat. Dr. Smith, sat\ufffd hello mat." then EOS; the stop string cuts it inside " hello mat".
    story = [token_id(w) for w in ("Ġcat", ".", "ĠDr", ".", "ĠSmith", ",", "Ġsat")]
    story += [stray, token_id("Ġhello"), token_id("Ġmat"), token_id("."), EOS]
    runner.script[first] = story
    call = stub.Generate()
    for chunking in ("TOKEN", "WORD", "SENTENCE", "CLAUSE"):
        for stop in ([], ["o mat"]):
            output = pb.OutputOptions(
                chunking=pb.Chunking.Value(f"CHUNKING_{chunking}"), token_ids=True, logprobs=True
            )
            await call.write(
                pb.GenerateRequest(
                    start=pb.Start(
                        request_id=f"{chunking}-{len(stop)}",
                        token_ids=pb.TokenIds(ids=[first]),
                        stopping=pb.StoppingParams(max_tokens=30, stop=stop),
                        output=output,
                    )
                )
            )
    await call.done_writing()
    responses = await read_rest(call)
    for stop in ([], ["o mat"]):
        sent = {}
        for chunking in ("TOKEN", "WORD", "SENTENCE", "CLAUSE"):
            mine = of(responses, f"{chunking}-{len(stop)}")
            finished = check_lifecycle(mine)
            chunks = [r.chunk for r in mine if r.HasField("chunk")]
            check_chunk_tokens([(c.text, c.token_ids) for c in chunks], story, runner.tokenizer.decode)
            covered = 0
            for chunk in chunks:
                assert chunk.index == covered
                assert [lp.token_id for lp in chunk.logprobs] == list(chunk.token_ids)
                covered += len(chunk.token_ids)
            assert finished.sent_tokens == covered
            sent[chunking] = (text_of(mine), [t for c in chunks for t in c.token_ids])
        assert all(s == sent["TOKEN"] for s in sent.values()), sent
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


async def test_server_assigns_an_id_when_empty(stub: pb_grpc.TokenWireStub) -> None:
    call = stub.Generate()
    await call.write(start("", 3))
    await call.done_writing()
    responses = await read_rest(call)
    ids = {r.request_id for r in responses}
    assert len(ids) == 1 and "" not in ids
    check_lifecycle(responses)


async def test_interrupt_stops_one_and_leaves_the_other(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    fake(served).step_delay = 0.005
    call = stub.Generate()
    await call.write(start("stop-me", 80))
    await call.write(start("keep-me", 60))
    seen: list[pb.GenerateResponse] = []
    while True:
        response = await asyncio.wait_for(call.read(), 5)
        seen.append(response)
        if response.request_id == "stop-me" and response.HasField("chunk"):
            break
    await call.write(interrupt("stop-me"))
    seen += await read_until_done(call, ["stop-me", "keep-me"])
    stopped = check_lifecycle(of(seen, "stop-me"))
    assert stopped.reason == pb.STOP_REASON_INTERRUPTED
    assert 0 < stopped.usage.completion_tokens < 80
    assert stopped.sent_tokens <= stopped.usage.completion_tokens
    kept = check_lifecycle(of(seen, "keep-me"))
    assert kept.reason == pb.STOP_REASON_MAX_TOKENS and kept.usage.completion_tokens == 60
    # Interrupting it again (it has ended) or an id never seen: an Error naming that id; the stream goes on.
    await call.write(interrupt("stop-me"))
    await call.write(interrupt("nobody"))
    errors = [await asyncio.wait_for(call.read(), 5) for _ in range(2)]
    assert [(e.request_id, e.error.code, e.error.field) for e in errors] == [
        ("stop-me", grpc.StatusCode.NOT_FOUND.value[0], "interrupt.request_id"),
        ("nobody", grpc.StatusCode.NOT_FOUND.value[0], "interrupt.request_id"),
    ]
    await call.write(start("after", 2))
    check_lifecycle(await read_until_done(call, ["after"]))
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_interrupt_only_reaches_requests_of_its_own_stream(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    fake(served).step_delay = 0.005
    owner, other = stub.Generate(), stub.Generate()
    await owner.write(start("mine", 40))
    assert (await asyncio.wait_for(owner.read(), 5)).HasField("started")
    await other.write(interrupt("mine"))
    error = await asyncio.wait_for(other.read(), 5)
    assert error.error.code == grpc.StatusCode.NOT_FOUND.value[0] and error.request_id == "mine"
    await owner.done_writing()
    await other.done_writing()
    responses = await read_rest(owner)
    assert responses[-1].finished.reason == pb.STOP_REASON_MAX_TOKENS


async def test_cancel_from_a_second_channel(served: RunningServer, stub: pb_grpc.TokenWireStub) -> None:
    fake(served).step_delay = 0.005
    call = stub.Generate()
    await call.write(start("c1", 200))
    seen: list[pb.GenerateResponse] = []
    while not any(r.HasField("chunk") for r in seen):
        seen.append(await asyncio.wait_for(call.read(), 5))
    async with grpc.aio.insecure_channel(served.address) as second:
        other = pb_grpc.TokenWireStub(second)
        answer = await other.Cancel(pb.CancelRequest(request_id="c1"))
        assert answer.found and answer.summary.reason == pb.STOP_REASON_CANCELLED
        seen += await read_until_done(call, ["c1"])
        finished = check_lifecycle(seen)
        assert finished == answer.summary  # the summary is exactly what the stream was told
        assert 0 < finished.usage.completion_tokens < 200
        again = await other.Cancel(pb.CancelRequest(request_id="c1"))
        assert not again.found and not again.HasField("summary")
        assert not (await other.Cancel(pb.CancelRequest(request_id="never-was"))).found
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await other.Cancel(pb.CancelRequest())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in (caught.value.details() or "")
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["cancel", "deadline", "close_channel"])
async def test_rpc_ending_aborts_its_requests(served: RunningServer, how: str) -> None:
    engine = served.engine
    assert engine is not None
    fake(served).step_delay = 0.01  # the requests would run for ~2.5 s on their own
    ended: dict[str, StopReason] = {}
    both_ended = threading.Event()

    def record(request: GenerationRequest, result: Finished | Failure) -> None:
        ended[request.request_id] = result.reason if isinstance(result, Finished) else StopReason.ERROR
        if len(ended) == 2:
            both_ended.set()

    after_each_finish(engine, record)
    channel = grpc.aio.insecure_channel(served.address)
    stub = pb_grpc.TokenWireStub(channel)
    call = stub.Generate(timeout=0.5) if how == "deadline" else stub.Generate()
    await call.write(start("long-1", None))
    await call.write(start("long-2", None))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.HasField("started") and engine.num_live() == 2
    if how == "cancel":
        call.cancel()
    elif how == "close_channel":
        await channel.close()
    with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
        await read_rest(call)
    assert await asyncio.to_thread(both_ended.wait, 5.0), ended
    # Stopped by the RPC's end, not run to their own (CONTEXT_LENGTH, seconds later).
    assert ended == {"long-1": StopReason.CANCELLED, "long-2": StopReason.CANCELLED}
    await wait_until_idle(engine)
    await channel.close()
    # A new request is not slowed by the abandoned ones: every forward it takes is its own alone.
    fake(served).step_delay = 0.002
    before = len(fake(served).calls)
    async with grpc.aio.insecure_channel(served.address) as fresh:
        call = pb_grpc.TokenWireStub(fresh).Generate()
        await call.write(start("next", 5))
        await call.done_writing()
        responses = await read_rest(call)
        assert check_lifecycle(responses).reason == pb.STOP_REASON_MAX_TOKENS
    forwards = fake(served).calls[before:]
    assert [kind for kind, _ in forwards] == ["prefill"] + ["decode"] * 4  # a token each
    assert all(len(sequences) == 1 for _, sequences in forwards), forwards  # type: ignore[arg-type]


async def test_half_close_lets_running_requests_finish(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    fake(served).step_delay = 0.005
    call = stub.Generate()
    for rid in ("h1", "h2", "h3"):
        await call.write(start(rid, 25))
    await call.done_writing()  # before anything has been generated
    responses = await read_rest(call)
    assert await call.code() == grpc.StatusCode.OK
    for rid in ("h1", "h2", "h3"):
        assert check_lifecycle(of(responses, rid)).usage.completion_tokens == 25
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


# ---- bad input and limits ----

INVALID, NOT_FOUND, EXISTS, EXHAUSTED = 3, 5, 6, 8

BAD_REQUESTS = [
    (pb.GenerateRequest(), "kind"),
    (pb.GenerateRequest(start=pb.Start(request_id="b1")), "start.input"),
    (start("b2", prompt=""), "start.input"),
    (start("b3", sampling=pb.SamplingParams(temperature=-1)), "start.sampling.temperature"),
    (start("b4", sampling=pb.SamplingParams(top_p=1.5)), "start.sampling.top_p"),
    (start("b5", sampling=pb.SamplingParams(top_p=float("nan"))), "start.sampling.top_p"),
    (start("b6", output=pb.OutputOptions(chunking=42)), "start.output.chunking"),  # type: ignore[arg-type]
    (start("b7", output=pb.OutputOptions(top_logprobs=50)), "start.output.top_logprobs"),
    (start("b8", stopping=pb.StoppingParams(max_tokens=0)), "start.stopping.max_tokens"),
    (start("b9", stopping=pb.StoppingParams(max_tokens=2, min_tokens=3)), "start.stopping.min_tokens"),
    (start("b10", stopping=pb.StoppingParams(stop=[""])), "start.stopping.stop"),
    (pb.GenerateRequest(start=pb.Start(request_id="b11", chat=pb.Chat())), "start.chat.messages"),
    (start("x" * 129), "start.request_id"),
    # Checked by the engine, against the model:
    (start("b12", 250, prompt=" hello" * 10), "start.stopping.max_tokens"),  # prompt + max_tokens > context
    (start("b13", prompt=" hello" * 300), "start.input"),  # the prompt alone fills the context
    (
        pb.GenerateRequest(start=pb.Start(request_id="b14", token_ids=pb.TokenIds(ids=[3, 9999]))),
        "start.token_ids.ids",
    ),
    (
        pb.GenerateRequest(
            start=pb.Start(
                request_id="b15", chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])
            )
        ),
        "start.chat",
    ),
    (interrupt("b16", mode=9), "interrupt.mode"),
]


async def test_bad_input_names_its_field_and_the_stream_goes_on(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    call = stub.Generate()
    for message, _ in BAD_REQUESTS:
        await call.write(message)
    await call.write(start("good", 3))
    await call.done_writing()
    responses = await read_rest(call)
    assert await call.code() == grpc.StatusCode.OK
    errors = [r for r in responses if r.HasField("error")]
    assert [(e.error.code, e.error.field) for e in errors] == [(INVALID, field) for _, field in BAD_REQUESTS]
    for error in errors:
        assert error.error.field in error.error.message
    assert errors[0].request_id == "" and errors[1].request_id == "b1"
    check_lifecycle(of(responses, "good"))
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


async def test_refused_ids_are_logged_escaped_and_capped(
    stub: pb_grpc.TokenWireStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tokenwire.servicer")
    forged = "r\n2024-01-01 00:00:00,000 INFO tokenwire.server: forged"
    huge = "h" * 100_000
    call = stub.Generate()
    await call.write(pb.GenerateRequest(start=pb.Start(request_id=forged, prompt="")))  # start.input
    await call.write(start(huge, 3))  # start.request_id: too long
    await call.done_writing()
    responses = await read_rest(call)
    assert [r.error.field for r in responses] == ["start.input", "start.request_id"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenwire.servicer"]
    assert len(lines) == 2 and not any("\n" in line for line in lines), lines
    assert lines[0] == (
        f"request refused request_id={forged!r} principal=anonymous code=INVALID_ARGUMENT field=start.input: "
        "prompt must not be empty"
    )
    assert len(lines[1]) < 400 and "(cut: 100,000 characters)" in lines[1], lines[1]
    assert "field=start.request_id: at most 128 characters" in lines[1]
    logged_ids = [getattr(r, "request_id", None) for r in caplog.records if r.name == "tokenwire.servicer"]
    assert logged_ids == [forged, "h" * 128]


UNPRINTABLE_IDS = [
    "a\nb",
    "a\rb",
    "a\tb",
    "a\x00b",
    "\x1b[31mred",
    "a\u2028b",
    "a\u2029b",
    "evil\u202etxt",
    "a\u200bb",
]


async def test_unprintable_request_ids_are_refused_naming_the_field(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    """Ids with control, format or separator characters: a Start, an Interrupt and a Cancel naming
    one are refused (INVALID_ARGUMENT, their own field), and the stream goes on."""
    call = stub.Generate()
    for bad in UNPRINTABLE_IDS:
        await call.write(start(bad, 3))
        await call.write(interrupt(bad))
    await call.write(start("ok\u00e9 \u4e2d", 2))  # printable, not ASCII: fine
    errors: list[pb.GenerateResponse] = []
    responses = []
    while len(errors) < 2 * len(UNPRINTABLE_IDS):
        response = await asyncio.wait_for(call.read(), 5)
        responses.append(response)
        if response.HasField("error"):
            errors.append(response)
    expected = [(bad, f) for bad in UNPRINTABLE_IDS for f in ("start.request_id", "interrupt.request_id")]
    assert [(e.request_id, e.error.field) for e in errors] == expected
    for error in errors:
        assert error.error.code == INVALID and error.error.message.startswith(f"{error.error.field}: ")
        assert "printable" in error.error.message
    for bad in UNPRINTABLE_IDS:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Cancel(pb.CancelRequest(request_id=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith("request_id: ")
    await call.done_writing()
    responses += await read_rest(call)
    check_lifecycle(of(responses, "ok\u00e9 \u4e2d"))
    await wait_until_idle(served.engine)  # type: ignore[arg-type]


async def test_duplicate_live_id_is_refused_server_wide(
    served: RunningServer, stub: pb_grpc.TokenWireStub
) -> None:
    fake(served).step_delay = 0.005
    first, second = stub.Generate(), stub.Generate()
    await first.write(start("dup", 40))
    assert (await asyncio.wait_for(first.read(), 5)).HasField("started")
    await first.write(start("dup", 5))  # same stream
    await second.write(start("dup", 5))  # another stream
    for call in (first, second):
        response = await asyncio.wait_for(call.read(), 5)
        while response.HasField("chunk"):  # the live one's chunks, on the first stream
            response = await asyncio.wait_for(call.read(), 5)
        assert response.request_id == "dup" and response.error.code == EXISTS
        assert response.error.field == "start.request_id"
    await first.done_writing()
    responses = await read_rest(first)
    assert responses[-1].finished.reason == pb.STOP_REASON_MAX_TOKENS  # the first one is untouched
    await second.write(start("dup", 2))  # free again once it ended
    check_lifecycle(await read_until_done(second, ["dup"]))
    await second.done_writing()


async def test_too_many_live_requests() -> None:
    config = EngineConfig(max_batch_size=4, max_live_requests=3)
    async with (
        running_server(config, step_delay=0.01) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        call = pb_grpc.TokenWireStub(ch).Generate()
        for i in range(4):
            await call.write(start(f"r{i}", 100))
        response = await asyncio.wait_for(call.read(), 5)
        while not response.HasField("error"):
            response = await asyncio.wait_for(call.read(), 5)
        assert response.request_id == "r3" and response.error.code == EXHAUSTED
        for i in range(3):
            await call.write(interrupt(f"r{i}"))
        await read_until_done(call, ["r0", "r1", "r2"])
        await call.write(start("r3", 2))  # room again
        check_lifecycle(await read_until_done(call, ["r3"]))
        await call.done_writing()


async def test_message_size_limit() -> None:
    async with (
        running_server(max_message_bytes=64 * 1024) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.TokenWireStub(ch)
        call = stub.Generate()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.write(start("big", 5, prompt=" hello" * 20_000))  # ~120 KB
            await read_rest(call)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(pb.TokenizeRequest(text="x" * 100_000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The server goes on serving.
        call = stub.Generate()
        await call.write(start("small", 3))
        await call.done_writing()
        check_lifecycle(await read_rest(call))
        assert server.engine is not None
        await wait_until_idle(server.engine)


# ---- unary RPCs ----


async def test_model_info_and_tokenize(stub: pb_grpc.TokenWireStub) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.context_length, info.max_batch_size) == ("fake", 256, 4)
    assert info.max_live_requests == FAKE_ENGINE.max_live_requests and list(info.eos_token_ids) == [1]
    assert info.has_chat_template and info.server_version
    tokens = await stub.Tokenize(pb.TokenizeRequest(text=" hello world"))
    assert list(tokens.tokens) == [" hello", " world"] and len(tokens.token_ids) == 2
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=" cat")])
    assert len((await stub.Tokenize(pb.TokenizeRequest(chat=chat))).token_ids) == 2
    for request, field in [
        (pb.TokenizeRequest(), "input"),
        (pb.TokenizeRequest(chat=pb.Chat()), "chat.messages"),
        (pb.TokenizeRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot")])), "chat"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (caught.value.details() or "").startswith(field)


# ---- health, reflection, drain ----


async def health_of(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        return int(response.status)


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_serving(served: RunningServer) -> None:
    assert await health_of(served.address) == SERVING
    assert await health_of(served.address, "tokenwire.v1.TokenWire") == SERVING


async def test_not_serving_until_the_engine_is_attached() -> None:
    config = ServerConfig(host="127.0.0.1", port=0, health_interval_s=0.05)
    server = await serve(None, config)
    try:
        assert await health_of(server.address) == NOT_SERVING
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TokenWireStub(ch).GetModelInfo(pb.GetModelInfoRequest())
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            call = pb_grpc.TokenWireStub(ch).Generate()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.write(start("early", 3))
                await read_rest(call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        engine = Engine(FakeRunner(), FAKE_ENGINE)
        engine.start()
        await server.attach(engine)
        assert await health_of(server.address, "tokenwire.v1.TokenWire") == SERVING
    finally:
        await server.stop(0)


async def health_becomes(watch: Any, status: int, timeout: float = 5.0) -> None:
    """Read a Health.Watch stream until it reports `status`."""
    while True:
        response = await asyncio.wait_for(watch.read(), timeout)
        assert response is not grpc.aio.EOF, f"the health watch ended before status {status}"
        if response.status == status:
            return


async def test_stuck_step_loop_turns_health_not_serving() -> None:
    config = EngineConfig(max_batch_size=4, stuck_after_s=0.2)
    async with running_server(config) as server, grpc.aio.insecure_channel(server.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        await health_becomes(watch, SERVING)
        release = threading.Event()

        def stall() -> None:
            release.wait(5)

        fake(server).on_forward = stall
        call = pb_grpc.TokenWireStub(ch).Generate()
        await call.write(start("stuck", 3))
        await health_becomes(watch, NOT_SERVING)  # the step has run longer than stuck_after_s
        assert await health_of(server.address) == NOT_SERVING
        release.set()
        check_lifecycle(await read_until_done(call, ["stuck"]))
        await health_becomes(watch, SERVING)  # and back, once the step loop moves again
        assert await health_of(server.address) == SERVING
        await call.done_writing()
        watch.cancel()


async def test_reflection_lists_the_service(served: RunningServer) -> None:
    async with grpc.aio.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        responses = await read_rest(call)
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"tokenwire.v1.TokenWire", "grpc.health.v1.Health"} <= names


async def test_drain_finishes_running_work_and_refuses_new() -> None:
    async with running_server(step_delay=0.005) as server, grpc.aio.insecure_channel(server.address) as ch:
        engine = server.engine
        assert engine is not None
        gate = ForwardGate()  # holds the model: "running" cannot end before the drain has begun
        fake(server).on_forward = gate
        call = pb_grpc.TokenWireStub(ch).Generate()
        await call.write(start("running", 60))
        await gate.held()  # admitted, in its prefill
        stopping = asyncio.create_task(server.stop(grace_s=5.0))
        await until(lambda: not engine.accepting, what="the engine refuses new requests")
        assert engine.num_live() == 1  # the drain began with work still running
        assert await health_of(server.address) == NOT_SERVING
        await call.write(start("late", 5))
        gate.open()
        seen = await read_until_done(call, ["running", "late"])
        assert of(seen, "late")[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert check_lifecycle(of(seen, "running")).reason == pb.STOP_REASON_MAX_TOKENS
        await asyncio.wait_for(stopping, 5)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE  # the server ended the open stream


async def test_drain_grace_period_ends_the_rest_with_shutdown() -> None:
    """A request the drain cuts short says so (the client may retry it elsewhere); a request's own
    time limit still ends it with DEADLINE."""
    async with running_server(step_delay=0.01) as server, grpc.aio.insecure_channel(server.address) as ch:
        call = pb_grpc.TokenWireStub(ch).Generate()
        await call.write(start("too-long", None))
        await call.write(start("timed", None, stopping=pb.StoppingParams(time_limit_ms=100)))
        await call.done_writing()
        seen = await read_until_done(call, ["timed"])
        await server.stop(grace_s=0.2)
        responses = seen + await read_rest(call)
        assert check_lifecycle(of(responses, "timed")).reason == pb.STOP_REASON_DEADLINE
        finished = check_lifecycle(of(responses, "too-long"))
        assert finished.reason == pb.STOP_REASON_SHUTDOWN and finished.sent_text_chars > 0
        assert await call.code() == grpc.StatusCode.OK  # the client had half-closed: a normal end


async def test_stop_now_ends_each_live_request_with_an_error() -> None:
    """A second signal during the drain: every live request gets an Error (UNAVAILABLE) at once,
    instead of the rest of its grace period, and the streams end UNAVAILABLE."""
    async with running_server(step_delay=0.01) as server, grpc.aio.insecure_channel(server.address) as ch:
        engine = server.engine
        assert engine is not None
        calls = {f"long-{n}": pb_grpc.TokenWireStub(ch).Generate() for n in range(2)}
        for request_id, call in calls.items():
            await call.write(start(request_id, None))
            await read_first_chunk(call, request_id, [])
        draining = asyncio.create_task(server.stop(grace_s=60))
        await until(lambda: not engine.accepting, what="the drain began")
        await asyncio.wait_for(server.stop_now(), 5)
        for request_id, call in calls.items():
            last = (await read_until_done(call, [request_id]))[-1]
            assert last.WhichOneof("kind") == "error" and last.request_id == request_id
            assert (
                last.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "stopping" in last.error.message
            )
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(draining, 5)  # nothing is left for the drain to wait for
        assert engine.num_live() == 0


# ---- security ----


async def test_bearer_token_guards_every_rpc_but_health() -> None:
    async with running_server(auth_token="s3cret") as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = pb_grpc.TokenWireStub(ch)
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
            call = stub.Generate(metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.write(start("a", 3))  # may already fail: the server refuses before reading
                await read_rest(call)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Cancel(pb.CancelRequest(request_id="a"), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await health_of(server.address) == SERVING  # probes carry no token

        good = (("authorization", "Bearer s3cret"),)
        call = stub.Generate(metadata=good)
        await call.write(start("a", 3))
        await call.done_writing()
        check_lifecycle(await read_rest(call))
        assert not (await stub.Cancel(pb.CancelRequest(request_id="a"), metadata=good)).found


async def test_bearer_scheme_is_case_insensitive() -> None:
    """RFC 7235: the auth scheme's name is case-insensitive; the token itself is not."""
    async with running_server(auth_token="s3cret") as server, grpc.aio.insecure_channel(server.address) as ch:
        stub = pb_grpc.TokenWireStub(ch)
        for scheme in ("bearer", "BEARER", "bEaReR"):
            good = (("authorization", f"{scheme} s3cret"),)
            assert not (await stub.Cancel(pb.CancelRequest(request_id="a"), metadata=good)).found
            call = stub.Generate(metadata=good)
            await call.write(start("a", 3))
            await call.done_writing()
            check_lifecycle(await read_rest(call))
        for value in ("bearer S3CRET", "Basic s3cret", "Bearers3cret", "bearer s3cret2", "s3cret"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Cancel(pb.CancelRequest(request_id="a"), metadata=(("authorization", value),))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, value


async def _model_name(address: str, credentials: grpc.ChannelCredentials) -> str:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        info = await pb_grpc.TokenWireStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        return info.model


async def test_tls_and_mutual_tls(certs: Path) -> None:
    ca = (certs / "ca.pem").read_bytes()
    client_key, client_cert = (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()
    tls: dict[str, Any] = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    async with running_server(**tls) as server:
        assert await _model_name(server.address, grpc.ssl_channel_credentials(ca)) == "fake"
        async with grpc.aio.secure_channel(server.address, grpc.ssl_channel_credentials(ca)) as channel:
            call = pb_grpc.TokenWireStub(channel).Generate()
            await call.write(start("tls", 3))
            await call.done_writing()
            check_lifecycle(await read_rest(call))
        async with grpc.aio.insecure_channel(server.address) as plain:  # no TLS: no service
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TokenWireStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    async with running_server(**tls, tls_client_ca=str(certs / "ca.pem")) as server:
        with_cert = grpc.ssl_channel_credentials(ca, client_key, client_cert)
        assert await _model_name(server.address, with_cert) == "fake"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _model_name(server.address, grpc.ssl_channel_credentials(ca))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- metrics ----


async def test_metrics_move_after_a_generation() -> None:
    port = free_port()
    async with running_server(metrics_port=port) as server, grpc.aio.insecure_channel(server.address) as ch:
        assert server.metrics_port == port
        engine = server.engine
        assert engine is not None
        # The step thread records a step's metrics after delivering its outputs: wait until the step
        # that ended the generation was recorded (the first step after which the engine is idle).
        last_step_recorded = threading.Event()

        def check(seconds: float, batch: int) -> None:
            if engine.is_idle():
                last_step_recorded.set()

        after_each_step(engine, check)
        call = pb_grpc.TokenWireStub(ch).Generate()
        await call.write(start("m", 7))
        await call.write(start("bad", 7, sampling=pb.SamplingParams(top_p=2)))
        await call.done_writing()
        await read_rest(call)
        assert await asyncio.to_thread(last_step_recorded.wait, 5.0)
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['tokenwire_requests_total{reason="max_tokens"}'] == 1
    assert samples['tokenwire_requests_refused_total{code="INVALID_ARGUMENT"}'] == 1
    assert samples["tokenwire_generated_tokens_total"] == 7
    assert samples["tokenwire_time_to_first_token_seconds_count"] == 1
    assert samples["tokenwire_inter_token_seconds_count"] == 1
    assert samples["tokenwire_step_seconds_count"] >= 6  # a prefill (first token), then decodes
    assert samples["tokenwire_batch_size_count"] >= 5
    assert samples["tokenwire_live_requests"] == 0 and samples["tokenwire_kv_slots_in_use"] == 0
    assert samples["tokenwire_kv_slots"] == 4 and samples["tokenwire_session_cache_bytes"] == 0


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name and not name.startswith("#")
    }


async def test_load_gauges_also_carry_the_names_an_inference_gateway_scrapes() -> None:
    """vllm:num_requests_waiting, vllm:num_requests_running and vllm:kv_cache_usage_perc (0-1), the
    names the Gateway API Inference Extension's endpoint picker reads, say what our own gauges say."""
    port = free_port()
    async with (
        running_server(metrics_port=port, step_delay=0.01) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        engine = server.engine
        assert engine is not None
        idle = await asyncio.to_thread(_scrape, port)
        assert idle["vllm:num_requests_waiting"] == idle["vllm:num_requests_running"] == 0
        assert idle["vllm:kv_cache_usage_perc"] == 0
        call = pb_grpc.TokenWireStub(ch).Generate()
        for number in range(6):  # 4 KV slots: 4 run to the context's end (~2.5 s), 2 wait
            await call.write(start(f"long-{number}", None))
        await until(lambda: (engine.num_running, engine.num_waiting) == (4, 2), what="4 running, 2 waiting")
        busy = await asyncio.to_thread(_scrape, port)
        call.cancel()
    assert busy["vllm:num_requests_running"] == busy["tokenwire_running_requests"] == 4
    assert busy["vllm:num_requests_waiting"] == busy["tokenwire_waiting_requests"] == 2
    in_use = busy["tokenwire_kv_slots_in_use"] / busy["tokenwire_kv_slots"]
    assert busy["vllm:kv_cache_usage_perc"] == in_use == 1.0


# ---- configuration ----


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_PORT", "6000")
    monkeypatch.setenv("TOKENWIRE_NO_REFLECTION", "true")
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKEN", "from-env")
    parser = build_parser()
    assert "from-env" not in parser.format_help()  # a secret is never printed
    server, model = configs_from_args(
        parser.parse_args(["--grace-period", "2.5", "--max-live-requests", "9"])
    )
    assert (server.port, server.reflection, server.auth_token, server.grace_period_s) == (
        6000,
        False,
        "from-env",
        2.5,
    )
    assert server.host == "127.0.0.1" and server.max_message_bytes == 4 * 1024 * 1024
    assert model.engine_config().max_live_requests == 9 and model.model == "default"
    assert model.engine_config().prefill_attention_span == 1024  # the server weighs deep prompt tokens
    monkeypatch.setenv("TOKENWIRE_PREFILL_ATTENTION_SPAN", "0")
    assert configs_from_args(build_parser().parse_args([]))[1].engine_config().prefill_attention_span == 0
    # A flag beats the environment.
    assert configs_from_args(parser.parse_args(["--port", "7000"]))[0].port == 7000
    options = dict(server_options(server))
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert "grpc.max_connection_idle_ms" not in options  # long idle streams are not cut by default


async def test_replica_id_names_the_stream_and_prefixes_assigned_ids() -> None:
    """Behind a load balancer, a client learns the replica from the Generate headers (or from an
    id it let the server assign) and sends it on Cancel, which the proxy routes by that header."""
    async with (
        running_server(replica_id="replica-7") as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        call = pb_grpc.TokenWireStub(ch).Generate()
        await call.write(
            pb.GenerateRequest(start=pb.Start(prompt=" hello", stopping=pb.StoppingParams(max_tokens=3)))
        )
        await call.done_writing()
        assert ("x-tokenwire-replica", "replica-7") in tuple(await call.initial_metadata())
        responses = await read_rest(call)
        assert responses and all(r.request_id.startswith("replica-7.") for r in responses)
        assert responses[-1].WhichOneof("kind") == "finished"


def test_the_finished_log_line_shows_the_request_id_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """An accepted id may hold a newline; the text log must not let it start a forged line."""
    from tokenwire.service.engine.requests import PromptInput
    from tokenwire.service.transport.server import _log_finished

    caplog.set_level(logging.INFO, logger="tokenwire.requests")
    forged = "a\nINFO tokenwire.server: forged"
    _log_finished(GenerationRequest(forged, PromptInput(text="x")), Finished(reason=StopReason.EOS))
    (record,) = [r for r in caplog.records if r.name == "tokenwire.requests"]
    assert "\n" not in record.getMessage() and "request_id='a\\nINFO" in record.getMessage()
    assert record.request_id == forged  # type: ignore[attr-defined]  # the JSON log escapes it itself


def test_metrics_stay_on_localhost_unless_an_address_is_named() -> None:
    """Metrics carry no auth: a server listening on every address must not publish them there too."""
    parser = build_parser()
    server, _ = configs_from_args(parser.parse_args(["--host", "0.0.0.0", "--metrics-port", "9100"]))
    assert (server.host, server.metrics_host) == ("0.0.0.0", "127.0.0.1")
    server, _ = configs_from_args(parser.parse_args(["--metrics-port", "9100", "--metrics-host", "0.0.0.0"]))
    assert server.metrics_host == "0.0.0.0"
    assert "no auth" in parser.format_help()

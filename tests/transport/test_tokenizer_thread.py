"""Tokenizing is off the event loop: while one input is stuck in the tokenizer, the server goes on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import running_server, wait_until_idle
from tests.fake_runner import FakeRunner
from tests.reliability.contract import read_until_done
from tests.waiting import until
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

SLOW = " cat sat on the mat"  # the one input the tokenizer gets stuck on
EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]


class StuckTokenizer:
    """Makes the fake runner's encode block on SLOW until `release` (at most 5 s: then it fails)."""

    def __init__(self, runner: FakeRunner) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released_in_time: bool | None = None
        self._encode = runner.encode

    def encode(self, text: str) -> list[int]:
        if text == SLOW:
            self.entered.set()
            self.released_in_time = self.release.wait(5)
            if not self.released_in_time:  # the loop was blocked: nothing could release it
                raise RuntimeError("the tokenizer was never released")
        return self._encode(text)

    async def wait_until_stuck(self) -> None:
        assert await asyncio.wait_for(asyncio.to_thread(self.entered.wait, 5), 6)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with running_server(step_delay=0.005) as running:
        yield running


@pytest.fixture
def stuck(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[StuckTokenizer]:
    assert server.engine is not None and isinstance(server.engine.runner, FakeRunner)
    tokenizer = StuckTokenizer(server.engine.runner)
    monkeypatch.setattr(server.engine.runner, "encode", tokenizer.encode)
    yield tokenizer
    tokenizer.release.set()


def start(request_id: str, prompt: str = "", max_tokens: int = 200) -> pb.GenerateRequest:
    stopping = pb.StoppingParams(max_tokens=max_tokens)
    if prompt:
        return pb.GenerateRequest(start=pb.Start(request_id=request_id, prompt=prompt, stopping=stopping))
    ids = pb.TokenIds(ids=[3, 4])
    return pb.GenerateRequest(start=pb.Start(request_id=request_id, token_ids=ids, stopping=stopping))


async def test_the_server_goes_on_while_a_start_is_being_tokenized(
    server: RunningServer, stuck: StuckTokenizer
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        running = stub.Generate()
        await running.write(start("running"))  # token ids: through the tokenizer thread before it sticks
        assert (await asyncio.wait_for(running.read(), 5)).HasField("started")

        blocked, rival = stub.Generate(), stub.Generate()
        await blocked.write(start("slow", SLOW, max_tokens=3))
        await stuck.wait_until_stuck()
        await rival.write(start("slow", SLOW, max_tokens=3))  # the same id, while the first is tokenized

        # Meanwhile: the running generation streams, and unary RPCs and health answer.
        chunk = await asyncio.wait_for(running.read(), 5)
        assert chunk.request_id == "running" and chunk.HasField("chunk")
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.model == "fake"
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not (await stub.Cancel(pb.CancelRequest(request_id="nobody"), timeout=5)).found
        cancelled = await stub.Cancel(pb.CancelRequest(request_id="running"), timeout=5)
        assert cancelled.found and cancelled.summary.reason == pb.STOP_REASON_CANCELLED
        assert not stuck.release.is_set()

        stuck.release.set()
        slow = await read_until_done(blocked, ["slow"], timeout=5)
        assert slow[0].HasField("started") and slow[-1].finished.reason == pb.STOP_REASON_MAX_TOKENS
        # The id was reserved before tokenizing: the rival was refused, not run beside it.
        refused = await asyncio.wait_for(rival.read(), 5)
        assert refused.request_id == "slow" and refused.error.code == EXISTS
        assert stuck.released_in_time
        for call in (running, blocked, rival):
            await call.done_writing()
    assert server.engine is not None
    await wait_until_idle(server.engine)


async def test_tokenize_waits_off_the_loop(server: RunningServer, stuck: StuckTokenizer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        slow = asyncio.ensure_future(stub.Tokenize(pb.TokenizeRequest(text=SLOW), timeout=10))
        await stuck.wait_until_stuck()
        assert (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)).model == "fake"
        assert not slow.done()
        stuck.release.set()
        tokens = await asyncio.wait_for(slow, 5)
        assert list(tokens.tokens) == [" cat", " sat", " on", " the", " mat"]
        assert stuck.released_in_time


async def test_a_stream_ending_while_its_start_is_tokenized_leaves_nothing_behind(
    server: RunningServer, stuck: StuckTokenizer
) -> None:
    assert server.engine is not None
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        call = stub.Generate()
        await call.write(start("gone", SLOW))
        await stuck.wait_until_stuck()
        call.cancel()
        stuck.release.set()
        await wait_until_idle(server.engine)  # the reservation was given back, nothing was queued
        again = stub.Generate()  # and the id is free
        await again.write(start("gone", max_tokens=2))
        assert (await read_until_done(again, ["gone"], timeout=5))[-1].HasField("finished")
        await again.done_writing()


async def test_a_deadline_drops_tokenizing_that_has_not_begun(
    server: RunningServer, stuck: StuckTokenizer
) -> None:
    """Work queued for the tokenizer thread behind a long input is dropped when its caller's deadline
    passes (or the caller goes away): it never runs, so a flood of expired requests costs nothing."""
    assert server.engine is not None
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)
    encoded: list[str] = []
    encode = stuck.encode

    def recording(text: str) -> list[int]:
        encoded.append(text)
        return encode(text)

    runner.encode = recording  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        first = asyncio.ensure_future(stub.Tokenize(pb.TokenizeRequest(text=SLOW), timeout=10))
        await stuck.wait_until_stuck()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Tokenize(pb.TokenizeRequest(text=" late tokenize"), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        expiring = stub.Generate(timeout=0.3)
        await expiring.write(start("late", " late start", max_tokens=2))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(expiring.read(), 5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The client saw its deadline pass; the server ends the RPCs on its own clock, a moment later.
        await until(lambda: not server.servicer._calls, what="the expired stream ended on the server")
        await asyncio.sleep(0.1)  # its reader's cancellation reaches the queued work

        stuck.release.set()
        await asyncio.wait_for(first, 5)
        await wait_until_idle(server.engine)
        assert encoded == [SLOW], encoded  # the expired ones were never tokenized

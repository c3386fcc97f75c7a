"""Client deadlines that expire mid-generation (or while still queued) stop the work on the server."""

from __future__ import annotations

import asyncio
import time

import grpc

from tests.conftest import wait_until_idle
from tests.reliability.conftest import Leaks, engine_of, fake_server
from tests.reliability.contract import check_generation, interrupt, read_first_chunk, read_until_done, start
from tokenwire.service.engine.engine import EngineConfig
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

STEP_S = 0.01  # a generation left alone would run ~10 s


async def _until_deadline(call: grpc.aio.StreamStreamCall) -> list[pb.GenerateResponse]:
    """Read until the RPC fails; it must be the deadline, with no Finished before it."""
    seen: list[pb.GenerateResponse] = []
    try:
        while True:
            response = await asyncio.wait_for(call.read(), 5)
            assert response is not grpc.aio.EOF, "the stream ended normally before its deadline"
            assert not response.HasField("finished"), response
            seen.append(response)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    return seen


async def test_deadline_mid_generation_stops_it_on_the_server() -> None:
    async with fake_server(step_delay=STEP_S) as server, grpc.aio.insecure_channel(server.address) as ch:
        engine = engine_of(server)
        leaks = Leaks()
        deadline = time.monotonic() + 0.5
        call = pb_grpc.TokenWireStub(ch).Generate(timeout=0.5)
        await call.write(start("d1", None))
        await call.write(start("d2", None, output=pb.OutputOptions(chunking=pb.CHUNKING_SENTENCE)))
        seen = await _until_deadline(call)
        assert sum(r.HasField("chunk") for r in seen) > 10  # it was well under way
        took = await wait_until_idle(engine, timeout=1.0)
        late = time.monotonic() - deadline
        print(f"\ndeadline: 2 requests freed {late * 1000:.0f} ms after the 0.5 s deadline")
        assert not server.servicer._calls
        assert took < 1.0
        await leaks.check()


async def test_deadline_of_a_request_still_waiting_for_a_row() -> None:
    one_row = EngineConfig(max_batch_size=1, max_live_requests=8)
    async with (
        fake_server(one_row, step_delay=STEP_S) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        engine = engine_of(server)
        stub = pb_grpc.TokenWireStub(ch)
        hog = stub.Generate()
        seen: list[pb.GenerateResponse] = []
        await hog.write(start("hog", None))
        await read_first_chunk(hog, "hog", seen)
        waiting = stub.Generate(timeout=0.3)
        await waiting.write(start("queued", 5))
        await waiting.done_writing()  # a half-closed stream still dies with its deadline
        assert await _until_deadline(waiting) == []  # never admitted: not even Started
        # Only the hog is left, and it runs on untouched.
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0
        while engine.num_live() != 1:
            assert loop.time() < until, f"{engine.num_live()} live after the deadline"
            await asyncio.sleep(0.005)
        assert engine.stream_of("queued") is None and engine.num_waiting == 0
        await hog.write(interrupt("hog"))
        await hog.done_writing()
        seen += await read_until_done(hog, ["hog"])
        assert check_generation(seen).reason == pb.STOP_REASON_INTERRUPTED
        await wait_until_idle(engine)


async def test_time_limit_and_deadline_together() -> None:
    """The server-side time limit ends a request normally (DEADLINE reason, Finished sent), well before
    a looser client deadline; the stream then goes on until its own deadline kills it."""
    async with fake_server(step_delay=STEP_S) as server, grpc.aio.insecure_channel(server.address) as ch:
        call = pb_grpc.TokenWireStub(ch).Generate(timeout=1.0)
        await call.write(start("limited", None, stopping=pb.StoppingParams(time_limit_ms=200)))
        finished = check_generation(await read_until_done(call, ["limited"]))
        assert finished.reason == pb.STOP_REASON_DEADLINE
        await call.write(start("cut", None))
        seen = await _until_deadline(call)
        assert seen and seen[0].HasField("started")
        await wait_until_idle(engine_of(server), timeout=1.0)

"""1,000 sequential generations, each ended a different way, against a server process: RSS stays flat.

The server runs in its own process (tests/reliability/server_main.py) so that its RSS is its alone.
Every way a request can end is in the mix, since each has its own cleanup path: a run to max_tokens,
an Interrupt (IMMEDIATE and AFTER_SEGMENT), a Cancel from the side, and a client that cancels its call.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import psutil
import pytest

from tests.reliability.conftest import ServerProcess
from tests.reliability.contract import check_generation, interrupt, read_first_chunk, read_rest, start
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

GENERATIONS = 1000
WARM_UP = 100
SENTENCES = pb.OutputOptions(chunking=pb.CHUNKING_SENTENCE)


async def _one(stub: pb_grpc.TokenWireStub, i: int) -> str:
    """One generation, ended by the i-th way; returns which."""
    request_id = f"g{i}"
    call = stub.Generate()
    way = ("max_tokens", "interrupt", "after_segment", "cancel", "vanish")[i % 5]
    if way == "max_tokens":
        await call.write(start(request_id, 20))
        await call.done_writing()
        finished = check_generation(await read_rest(call))
        assert finished.reason == pb.STOP_REASON_MAX_TOKENS
        return way
    await call.write(start(request_id, None, output=SENTENCES if way == "after_segment" else None))
    seen: list[pb.GenerateResponse] = []
    if way == "after_segment":  # SENTENCE chunks come later: Started is enough to know it runs
        seen.append(await asyncio.wait_for(call.read(), 10))
    else:
        await read_first_chunk(call, request_id, seen)
    if way == "vanish":
        call.cancel()
        return way
    if way == "cancel":
        assert (await stub.Cancel(pb.CancelRequest(request_id=request_id))).found
    else:
        mode = pb.INTERRUPT_MODE_AFTER_SEGMENT if way == "after_segment" else pb.INTERRUPT_MODE_IMMEDIATE
        await call.write(interrupt(request_id, mode))
    await call.done_writing()
    finished = check_generation(seen + await read_rest(call))
    expected = pb.STOP_REASON_CANCELLED if way == "cancel" else pb.STOP_REASON_INTERRUPTED
    assert finished.reason == expected, finished
    return way


@pytest.mark.slow
async def test_rss_flat_over_1000_generations() -> None:
    server = ServerProcess("--step-delay", "0.001")
    try:
        process = psutil.Process(server.pid)
        samples: dict[int, int] = {}
        began = time.monotonic()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.TokenWireStub(channel)
            for i in range(1, GENERATIONS + 1):
                await _one(stub, i)
                if i % 100 == 0:
                    await asyncio.sleep(0.2)  # let the last request's cleanup finish first
                    samples[i] = process.memory_info().rss
        took = time.monotonic() - began
        assert process.is_running() and server.process.poll() is None
    finally:
        server.stop()
    growth = (samples[GENERATIONS] - samples[WARM_UP]) / samples[WARM_UP]
    curve = ", ".join(f"{i}: {rss / 2**20:.1f}" for i, rss in samples.items())
    print(
        f"\n{GENERATIONS} generations in {took:.1f} s; server RSS MiB after n generations: {curve}; "
        f"growth {WARM_UP}->{GENERATIONS}: {growth * 100:+.2f}%"
    )
    assert growth < 0.05

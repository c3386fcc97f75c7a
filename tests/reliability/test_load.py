"""Many concurrent streams, two requests each, some interrupted, cancelled or abandoned: all end right.

Every stream plays one role. Streams whose client stays must see each request end with exactly one
terminal message of the expected kind; streams whose client vanishes (the call cancelled, or its
channel closed) must leave nothing behind. Afterwards the engine is idle and no asyncio task or
thread has leaked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import grpc
import pytest

from tests.conftest import wait_until_idle
from tests.reliability.conftest import Leaks, engine_of, fake_server
from tests.reliability.contract import (
    by_request,
    check_generation,
    interrupt,
    read_first_chunk,
    read_rest,
    read_until_done,
    start,
)
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

ROLES = ("normal", "interrupt", "cancel", "vanish_call", "vanish_channel")
SHARED_CHANNELS = 8  # streams (but not the vanishing channels) spread over a few connections


@dataclasses.dataclass
class Load:
    streams: int = 0
    requests: int = 0
    terminals: int = 0
    vanished: int = 0
    open_now: int = 0
    peak_open: int = 0
    peak_live: int = 0


async def _stream(
    server: RunningServer,
    index: int,
    role: str,
    channels: list[grpc.aio.Channel],
    control: pb_grpc.TokenWireStub,
    load: Load,
    short: int,
) -> None:
    first, second = f"s{index}-r0", f"s{index}-r1"
    own = grpc.aio.insecure_channel(server.address) if role == "vanish_channel" else None
    channel = own or channels[index % len(channels)]
    call = pb_grpc.TokenWireStub(channel).Generate()
    load.open_now += 1
    load.peak_open = max(load.peak_open, load.open_now)
    try:
        seen: list[pb.GenerateResponse] = []
        if role == "normal":
            await call.write(start(first, short))
            if index % 2:  # half the streams run their two requests one after the other
                seen += await read_until_done(call, [first], timeout=60)
            await call.write(start(second, short))
            await call.done_writing()
            grouped = by_request(seen + await read_rest(call, timeout=60))
            for request_id in (first, second):
                finished = check_generation(grouped[request_id])
                assert finished.reason == pb.STOP_REASON_MAX_TOKENS, finished
                assert finished.usage.completion_tokens == short
            assert await call.code() == grpc.StatusCode.OK
            load.terminals += 2
        elif role in ("interrupt", "cancel"):
            await call.write(start(first, None))  # would run to the context's end
            await call.write(start(second, short))
            await read_first_chunk(call, first, seen, timeout=60)
            if role == "interrupt":
                await call.write(interrupt(first))
            else:  # from another connection
                answer = await control.Cancel(pb.CancelRequest(request_id=first), timeout=30)
                assert answer.found and answer.summary.reason == pb.STOP_REASON_CANCELLED
            await call.done_writing()
            seen += await read_rest(call, timeout=60)
            grouped = by_request(seen)
            stopped = check_generation(grouped[first])
            expected = pb.STOP_REASON_INTERRUPTED if role == "interrupt" else pb.STOP_REASON_CANCELLED
            assert stopped.reason == expected, stopped
            if role == "cancel":
                assert stopped == answer.summary  # the summary is exactly what the stream was told
            assert check_generation(grouped[second]).usage.completion_tokens == short
            assert await call.code() == grpc.StatusCode.OK
            load.terminals += 2
        else:  # the client vanishes mid-stream
            await call.write(start(first, None))
            await call.write(start(second, None))
            await read_first_chunk(call, first, [], timeout=60)
            if role == "vanish_call":
                call.cancel()
            else:
                assert own is not None
                await own.close()
            with pytest.raises((asyncio.CancelledError, grpc.aio.AioRpcError)):
                await read_rest(call)
            load.vanished += 2
        load.requests += 2
    finally:
        load.open_now -= 1
        if own is not None:
            await own.close()


async def _watch_live(server: RunningServer, load: Load, stop: asyncio.Event) -> None:
    engine = engine_of(server)
    while not stop.is_set():
        load.peak_live = max(load.peak_live, engine.num_live())
        await asyncio.sleep(0.01)


async def run_load(streams: int, *, tokens: int, step_delay: float, time_limit: float) -> Load:
    """`tokens`: length of the requests that run to their end."""
    load = Load(streams=streams)
    async with fake_server(step_delay=step_delay) as server:
        engine = engine_of(server)
        await asyncio.sleep(0.2)  # let the server's own start-up tasks settle before counting
        leaks = Leaks()
        channels = [grpc.aio.insecure_channel(server.address) for _ in range(SHARED_CHANNELS)]
        control_channel = grpc.aio.insecure_channel(server.address)
        control = pb_grpc.TokenWireStub(control_channel)
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_live(server, load, stop))
        began = time.monotonic()
        roles = itertools.islice(itertools.cycle(ROLES), streams)
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    *(_stream(server, i, r, channels, control, load, tokens) for i, r in enumerate(roles))
                ),
                time_limit,
            )
        finally:
            stop.set()
            await watcher
            for channel in [*channels, control_channel]:
                await channel.close()
        took = time.monotonic() - began
        await wait_until_idle(engine, timeout=2.0)
        assert not server.servicer._calls, "a Generate call is still registered"
        # Settle: grpc's and the servicer's per-call tasks unwind a moment after the calls end.
        new_tasks, new_threads = await leaks.check(settle_s=0.5)
    print(
        f"\n{streams} streams ({load.requests} requests: {load.terminals} ended with a terminal, "
        f"{load.vanished} abandoned by their clients) in {took:.1f} s; peak {load.peak_open} open "
        f"streams, {load.peak_live} live requests; new tasks after {new_tasks} (grpc's accept loop), "
        f"threads {new_threads}"
    )
    return load


async def test_load_30_streams() -> None:
    load = await run_load(30, tokens=30, step_delay=0.001, time_limit=20)
    assert load.requests == 60 and load.peak_open == 30


@pytest.mark.slow
async def test_load_200_streams() -> None:
    load = await run_load(200, tokens=150, step_delay=0.002, time_limit=120)
    assert load.requests == 400 and load.peak_open == 200

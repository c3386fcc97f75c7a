"""Heartbeats on quiet Generate streams: the server sends one after --heartbeat-interval without a
response, ignores the client's, and neither touches a request's lifecycle."""

from __future__ import annotations

import asyncio

import grpc

from tests.conftest import running_server
from tests.reliability.contract import (
    by_request,
    check_generation,
    heartbeat,
    is_heartbeat,
    kind,
    read_rest,
    start,
)
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

INTERVAL_S = 0.2


async def _read(call: grpc.aio.StreamStreamCall, timeout: float = 5.0) -> pb.GenerateResponse:
    response = await asyncio.wait_for(call.read(), timeout)
    assert response is not grpc.aio.EOF
    return response


async def test_a_quiet_stream_gets_heartbeats_and_a_busy_one_none() -> None:
    async with (
        running_server(heartbeat_interval_s=INTERVAL_S) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        call = pb_grpc.TokenWireStub(channel).Generate()
        loop = asyncio.get_running_loop()
        began = loop.time()
        first = await _read(call)
        assert is_heartbeat(first) and first.request_id == ""
        assert INTERVAL_S * 0.8 <= loop.time() - began < INTERVAL_S + 1.0
        second = await _read(call)
        assert is_heartbeat(second)
        # A generation that streams faster than the interval gets no heartbeat among its messages.
        await call.write(start("busy", max_tokens=40))
        responses, beats = [], 0
        while not responses or kind(responses[-1]) != "finished":
            response = await _read(call)
            if is_heartbeat(response):
                beats += 1
            else:
                responses.append(response)
        check_generation(responses)
        assert beats <= 1, "at most one already queued from the quiet time before"
        await call.done_writing()
        rest = await read_rest(call)
        assert all(is_heartbeat(r) for r in rest) and await call.code() == grpc.StatusCode.OK


async def test_heartbeats_off() -> None:
    async with (
        running_server(heartbeat_interval_s=0) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        call = pb_grpc.TokenWireStub(channel).Generate()
        read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({read}, timeout=4 * INTERVAL_S)
        assert not done, "no heartbeat with --heartbeat-interval 0"
        call.cancel()
        await asyncio.gather(read, return_exceptions=True)


async def test_client_heartbeats_are_ignored_and_counted_as_messages() -> None:
    """A Heartbeat is answered with nothing, changes no request, and counts in message_index."""
    async with (
        running_server(heartbeat_interval_s=0) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        call = pb_grpc.TokenWireStub(channel).Generate()
        await call.write(heartbeat())
        await call.write(start("one", max_tokens=5))
        await call.write(heartbeat())
        await call.write(heartbeat())
        await call.write(pb.GenerateRequest())  # message 4: refused, naming its position
        await call.done_writing()
        responses = await read_rest(call)
        grouped = by_request(responses)
        assert set(grouped) == {"one", ""}
        check_generation(grouped["one"])
        [refusal] = grouped[""]
        assert refusal.error.field == "kind" and refusal.error.message_index == 4
        assert await call.code() == grpc.StatusCode.OK

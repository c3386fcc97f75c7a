"""The clients behind a proxy: they send Heartbeats on a quiet request side, never show the server's
as chunks, and send the replica header back on their own cancel of a generation they started."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.conftest import running_server
from tokenwire.client import AsyncClient, Client, StopReason
from tokenwire.service.transport.servicer import TokenWireServicer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1.metadata import REPLICA_HEADER

LONG = 200
BEAT_S = 0.1


@pytest.fixture
def cancel_headers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, str]]]:
    """The metadata of every Cancel the servers of this test receive."""
    seen: list[dict[str, str]] = []
    original = TokenWireServicer.Cancel

    async def recording(self: TokenWireServicer, request: pb.CancelRequest, context: Any) -> Any:
        seen.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        return await original(self, request, context)

    monkeypatch.setattr(TokenWireServicer, "Cancel", recording)  # before the server registers it
    yield seen


def _requests_read(server: Any) -> int:
    return sum(call.messages_read for call in server.servicer._calls)


async def test_async_client_heartbeats_and_skips_the_servers() -> None:
    async with (
        running_server(heartbeat_interval_s=BEAT_S, step_delay=0.03) as server,
        AsyncClient(server.address, heartbeat_s=BEAT_S) as client,
        client.stream() as stream,
    ):
        await asyncio.sleep(6 * BEAT_S)  # nothing to say: the client's heartbeats speak for it
        beats = _requests_read(server)
        assert 3 <= beats <= 8, beats
        # The server's heartbeats (100 ms) may come before and between this generation's messages
        # (30 ms a token): none shows as a chunk or an unclaimed error.
        generation = await stream.start(" hello", max_tokens=12)
        chunks = [chunk async for chunk in generation]
        assert all(chunk.request_id == generation.request_id for chunk in chunks)
        assert "".join(c.text for c in chunks) == generation.result.text
        assert not stream.unclaimed_errors
        await asyncio.sleep(4 * BEAT_S)  # the server's heartbeats on the quiet stream are dropped
        assert _requests_read(server) >= beats + 1 + 2


async def test_async_client_without_heartbeats() -> None:
    async with (
        running_server(heartbeat_interval_s=0) as server,
        AsyncClient(server.address, heartbeat_s=None) as client,
        client.stream() as stream,
    ):
        generation = await stream.start(" hello", max_tokens=3)
        await generation.final_result()
        await asyncio.sleep(4 * BEAT_S)
        assert _requests_read(server) == 1


async def test_sync_client_heartbeats() -> None:
    async with running_server(heartbeat_interval_s=BEAT_S) as server:

        def run() -> None:
            with Client(server.address, heartbeat_s=BEAT_S) as client, client.stream() as stream:
                time.sleep(6 * BEAT_S)
                assert 3 <= _requests_read(server) <= 8
                generation = stream.start(" hello", max_tokens=5)
                assert "".join(c.text for c in generation) == generation.result.text

        await asyncio.to_thread(run)


async def test_async_cancel_sends_the_replica_of_a_generation_it_started(
    cancel_headers: list[dict[str, str]],
) -> None:
    async with running_server(replica_id="r1") as server, AsyncClient(server.address) as client:
        generation = client.generate(" hello", max_tokens=LONG)
        await anext(generation)
        assert generation.replica == "r1"
        answer = await client.cancel(generation.request_id)  # no replica given
        assert answer.found and (await generation.final_result()).reason is StopReason.CANCELLED
        # Once it has ended, its id is forgotten: a Cancel for it carries no header.
        await client.cancel(generation.request_id)
        assert not client._started
        # Another client names the replica itself; a server without a replica id sends none.
        async with AsyncClient(server.address) as other:
            await other.cancel("someone-elses", replica="r9")
    assert [h.get(REPLICA_HEADER) for h in cancel_headers] == ["r1", None, "r9"]


async def test_async_cancel_right_after_start_waits_for_the_headers(
    cancel_headers: list[dict[str, str]],
) -> None:
    async with (
        running_server(replica_id="r2") as server,
        AsyncClient(server.address) as client,
        client.stream() as stream,
    ):
        generation = await stream.start(" hello", max_tokens=LONG)
        answer = await client.cancel(generation.request_id)
        assert answer.found and (await generation.final_result()).reason is StopReason.CANCELLED
    assert [h.get(REPLICA_HEADER) for h in cancel_headers] == ["r2"]


async def test_sync_cancel_sends_the_replica(cancel_headers: list[dict[str, str]]) -> None:
    async with running_server(replica_id="r3") as server:

        def run() -> None:
            with Client(server.address) as client:
                generation = client.generate(" hello", max_tokens=LONG)
                next(generation)
                assert generation.replica == "r3"
                answer = client.cancel(generation.request_id)
                assert answer.found and generation.final_result(10).reason is StopReason.CANCELLED
                assert not client._started

        await asyncio.to_thread(run)
    assert [h.get(REPLICA_HEADER) for h in cancel_headers] == ["r3"]


def test_a_stream_reset_in_transit_is_unavailable() -> None:
    """A proxy resets the stream (RST_STREAM, which gRPC calls INTERNAL) when the replica behind it dies:
    for the caller, a lost server to retry elsewhere. The server's own INTERNAL stays a ServerError."""
    from tokenwire.client import ServerError, Unavailable
    from tokenwire.client._errors import from_rpc_error

    class Failed(grpc.RpcError):
        def __init__(self, details: str) -> None:
            self._details = details

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INTERNAL

        def details(self) -> str:
            return self._details

    reset = from_rpc_error(Failed("Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"))
    assert isinstance(reset, Unavailable) and reset.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(from_rpc_error(Failed("internal error")), ServerError)

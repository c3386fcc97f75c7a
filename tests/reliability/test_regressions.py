"""Bugs the reliability suite found, each pinned by a small deterministic test."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.conftest import wait_until_idle
from tests.fake_runner import token_id
from tests.reliability.conftest import engine_of, fake_of, fake_server
from tests.reliability.contract import (
    by_request,
    check_generation,
    read_first_chunk,
    read_rest,
    read_until_done,
    start,
)
from tests.waiting import until
from tokenwire.service.engine.engine import EngineConfig
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

ONE_ROW = EngineConfig(max_batch_size=1, max_live_requests=8)


async def test_a_request_stopped_while_waiting_still_gets_started() -> None:
    """Found by the Generate fuzz: a Start interrupted before it was admitted got a bare Finished.
    The contract orders every accepted request's messages Started, Chunk*, Finished."""
    async with (
        fake_server(ONE_ROW, step_delay=0.005) as server,
        grpc.aio.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.TokenWireStub(ch)
        call = stub.Generate()
        seen: list[pb.GenerateResponse] = []
        await call.write(start("running", None))
        await read_first_chunk(call, "running", seen)
        # One KV row, held by "running": these three wait in the queue.
        await call.write(start("interrupted", 5))
        await call.write(start("cancelled", 5))
        await call.write(start("deadline", 5, stopping=pb.StoppingParams(max_tokens=5, time_limit_ms=30)))
        await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="interrupted")))
        # Nothing orders a Cancel on another connection after a Start the server has not read yet
        await until(lambda: engine_of(server).stream_of("cancelled") is not None, what="'cancelled' is live")
        answer = await stub.Cancel(pb.CancelRequest(request_id="cancelled"))
        assert answer.found
        await asyncio.sleep(0.1)  # past the 30 ms time limit
        await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id="running")))
        seen += await read_until_done(call, ["running", "interrupted", "cancelled", "deadline"])
        grouped = by_request(seen)
        for request_id, reason in [
            ("interrupted", pb.STOP_REASON_INTERRUPTED),
            ("cancelled", pb.STOP_REASON_CANCELLED),
            ("deadline", pb.STOP_REASON_DEADLINE),
        ]:
            finished = check_generation(grouped[request_id])
            assert finished.reason == reason and finished.usage.completion_tokens == 0
        assert answer.summary == grouped["cancelled"][-1].finished
        await call.done_writing()
        await wait_until_idle(engine_of(server))


async def test_an_unparsable_request_ends_the_rpc_with_invalid_argument() -> None:
    """Found by the raw-bytes fuzz: bytes that are not a GenerateRequest made the server drop the
    stream's live requests and then end the RPC with OK, as if every request had been answered."""
    async with fake_server(step_delay=0.005) as server, grpc.aio.insecure_channel(server.address) as ch:
        generate = ch.stream_stream(
            "/tokenwire.v1.TokenWire/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        call = generate()
        await call.write(start("live", None).SerializeToString())
        await read_first_chunk(call, "live", [])
        await call.write(b"\xff\xff\xff")  # field 0x1fffff.., truncated: wire format corrupt
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_rest(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "GenerateRequest" in (caught.value.details() or "")
        await wait_until_idle(engine_of(server))


async def test_stop_strings_are_not_delayed_by_min_tokens() -> None:
    """Found by the Generate fuzz, against an older contract text. As documented now, min_tokens
    keeps EOS and stop token ids from being sampled; a stop string still ends the generation (its
    text, and what follows, is never sent)."""
    async with fake_server() as server, grpc.aio.insecure_channel(server.address) as ch:
        script = [token_id(w) for w in ("Ġworld", "Ġthe", "Ġcat", "Ġsat", "Ġon", "Ġmat")]
        fake_of(server).script[token_id("Ġcat")] = script
        call = pb_grpc.TokenWireStub(ch).Generate()
        stopping = pb.StoppingParams(max_tokens=6, min_tokens=3, stop=[" world"])
        await call.write(start("min", prompt=" cat", stopping=stopping))
        await call.done_writing()
        finished = check_generation(await read_rest(call))
        assert finished.reason == pb.STOP_REASON_STOP_SEQUENCE and finished.stop_sequence == " world", (
            finished
        )
        assert finished.usage.completion_tokens == 1 and finished.sent_text_chars == 0, finished

"""End to end with the real default model: 8 concurrent streams, interrupted, cancelled or run out."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.conftest import wait_until_idle
from tests.reliability.contract import check_generation, is_terminal, kind, read_rest, read_until_done
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.transport.server import ServerConfig, serve
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.model]

QUESTIONS = [
    "Tell me a long story about a lighthouse keeper.",
    "Explain how rain forms, in detail.",
    "List twenty fruits and describe each one.",
    "Write a letter to a friend about your holiday.",
    "Describe the history of the bicycle.",
    "What is photosynthesis? Explain it step by step.",
    "Give me ten tips for learning to cook.",
    "Why is the sky blue? Answer at length.",
]
# Per stream: how it ends, and what else it asks for (the extremes of sampling included).
PLANS: list[tuple[str, dict[str, object]]] = [
    ("interrupt", {}),
    ("interrupt", {"sampling": pb.SamplingParams(temperature=0.8, seed=2**64 - 1)}),
    ("after_segment", {"output": pb.OutputOptions(chunking=pb.CHUNKING_SENTENCE)}),
    ("after_segment", {"output": pb.OutputOptions(chunking=pb.CHUNKING_CLAUSE, top_logprobs=5)}),
    ("cancel", {"sampling": pb.SamplingParams(temperature=1.0, top_k=40, top_p=0.9, min_p=0.05, seed=7)}),
    ("run", {"sampling": pb.SamplingParams(repetition_penalty=1.3)}),
    ("run", {"output": pb.OutputOptions(chunking=pb.CHUNKING_WORD, token_ids=True)}),
    ("run", {"stopping": pb.StoppingParams(max_tokens=40, stop=["\n\n"])}),
]


def _start(i: int, how: str, extra: dict[str, object]) -> pb.GenerateRequest:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTIONS[i])])
    stopping = extra.pop("stopping", pb.StoppingParams(max_tokens=40 if how == "run" else 200))
    return pb.GenerateRequest(start=pb.Start(request_id=f"real-{i}", chat=chat, stopping=stopping, **extra))  # type: ignore[arg-type]


async def _stream(address: str, control: pb_grpc.TokenWireStub, i: int) -> str:
    how, extra = PLANS[i]
    request_id = f"real-{i}"
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        await call.write(_start(i, how, dict(extra)))
        seen: list[pb.GenerateResponse] = []
        if how == "run":
            await call.done_writing()
            seen = await read_rest(call, timeout=120)
            output = extra.get("output")
            finished = check_generation(
                seen, token_ids=isinstance(output, pb.OutputOptions) and output.token_ids
            )
            assert finished.reason in (
                pb.STOP_REASON_MAX_TOKENS,
                pb.STOP_REASON_EOS,
                pb.STOP_REASON_STOP_SEQUENCE,
            )
            return pb.StopReason.Name(finished.reason)
        # Let it produce something first (three chunks, or for segment chunking the first segment).
        wanted = 1 if how == "after_segment" else 3
        while sum(kind(r) == "chunk" for r in seen) < wanted and not any(is_terminal(r) for r in seen):
            seen.append(await asyncio.wait_for(call.read(), 120))
        if not any(is_terminal(r) for r in seen):  # the model may end on its own first (EOS)
            if how == "cancel":
                answer = await control.Cancel(pb.CancelRequest(request_id=request_id))
                assert answer.found
            else:
                mode = (
                    pb.INTERRUPT_MODE_AFTER_SEGMENT if how == "after_segment" else pb.INTERRUPT_MODE_IMMEDIATE
                )
                await call.write(pb.GenerateRequest(interrupt=pb.Interrupt(request_id=request_id, mode=mode)))
            seen += await read_until_done(call, [request_id], timeout=120)
        await call.done_writing()
        seen += await read_rest(call, timeout=30)
        finished = check_generation(seen)
        expected = pb.STOP_REASON_CANCELLED if how == "cancel" else pb.STOP_REASON_INTERRUPTED
        assert finished.reason in (expected, pb.STOP_REASON_EOS), finished
        if finished.reason == pb.STOP_REASON_INTERRUPTED and how == "after_segment":
            chunks = [r.chunk for r in seen if kind(r) == "chunk"]
            # It stopped at a segment's end, or gave up waiting for one (then the rest is tail_text).
            assert chunks[-1].segment_end or finished.tail_text, finished
        assert await call.code() == grpc.StatusCode.OK
        return pb.StopReason.Name(finished.reason)


async def test_eight_streams_against_the_default_model() -> None:
    from tokenwire.service.model.runner import ModelRunner  # torch: only in this test

    began = time.monotonic()
    runner = await asyncio.to_thread(ModelRunner.load, "default", max_batch_size=8, max_context=1024)
    await asyncio.to_thread(runner.warm_up)
    loaded = time.monotonic() - began
    engine = Engine(runner, EngineConfig(max_batch_size=8))
    engine.start()
    server = await serve(engine, ServerConfig(host="127.0.0.1", port=0, grace_period_s=0.0))
    try:
        async with grpc.aio.insecure_channel(server.address) as control_channel:
            control = pb_grpc.TokenWireStub(control_channel)
            began = time.monotonic()
            reasons = await asyncio.wait_for(
                asyncio.gather(*(_stream(server.address, control, i) for i in range(len(PLANS)))), 300
            )
            took = time.monotonic() - began
        await wait_until_idle(engine, timeout=2.0)
    finally:
        await server.stop(0)
    print(f"\nreal model: loaded in {loaded:.1f} s; 8 streams in {took:.1f} s ended: {reasons}")

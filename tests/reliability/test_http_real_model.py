"""The OpenAI-compatible HTTP API end to end with the real default model and the real `openai` SDK:
greedy whole and streamed answers agree with each other and with gRPC, and a stream closed early stops."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import openai
import pytest

from tests.conftest import wait_until_idle
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.transport.server import ServerConfig, serve
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.slow, pytest.mark.model]

QUESTION = "Name three colours of the rainbow."
MESSAGES: Any = [{"role": "user", "content": QUESTION}]


async def _grpc_text(address: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        chat = pb.Chat(messages=[pb.ChatMessage(role="user", content=QUESTION)])
        start = pb.Start(request_id="grpc", chat=chat, stopping=pb.StoppingParams(max_tokens=24))
        await call.write(pb.GenerateRequest(start=start))
        await call.done_writing()
        return "".join([r.chunk.text async for r in call if r.WhichOneof("kind") == "chunk"])


async def test_the_sdk_against_the_default_model() -> None:
    from tokenwire.service.model.runner import ModelRunner  # torch: only in this test

    runner = await asyncio.to_thread(ModelRunner.load, "default", max_batch_size=4, max_context=1024)
    await asyncio.to_thread(runner.warm_up)
    engine = Engine(runner, EngineConfig(max_batch_size=4))
    engine.start()
    server = await serve(engine, ServerConfig(host="127.0.0.1", port=0, http_port=0, grace_period_s=0.0))
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0
        ) as client:
            models = await client.models.list()
            whole, stream, grpc_text = await asyncio.gather(
                client.chat.completions.create(
                    model=models.data[0].id, messages=MESSAGES, max_tokens=24, temperature=0
                ),
                client.chat.completions.create(
                    model=models.data[0].id,
                    messages=MESSAGES,
                    max_tokens=24,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                ),
                _grpc_text(server.address),
            )
            chunks = [chunk async for chunk in stream]
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            text = whole.choices[0].message.content
            assert text and text == streamed == grpc_text, (text, streamed, grpc_text)
            assert whole.choices[0].finish_reason in ("stop", "length")
            assert chunks[-1].usage is not None and whole.usage is not None
            assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

            long = await client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "Tell me a long story about a lighthouse."}],
                max_tokens=400,
                stream=True,
            )
            async for chunk in long:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            await long.close()
        await wait_until_idle(engine, timeout=2.0)  # the closed stream's request is gone within a step
    finally:
        await server.stop(0)
    print(f"\nreal model over HTTP: {text!r}")

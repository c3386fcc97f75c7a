"""The OpenAI-compatible HTTP API over real sockets: driven by the real `openai` SDK (whole, streamed,
a stream closed early, a bad parameter) and by httpx for the raw SSE framing, on the same server, engine
and fake runner as the gRPC tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.conftest import FAKE_ENGINE, free_port, running_server, wait_until_idle
from tests.waiting import until
from tokenwire.service.engine.engine import Engine
from tokenwire.service.engine.requests import Failure, Finished, GenerationRequest, StopReason
from tokenwire.service.transport.server import BindError, RunningServer, ServerConfig, serve
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

CHAT: Any = [{"role": "user", "content": " hello world"}]  # for the SDK too: Any
IMAGE = {"type": "image_url", "image_url": {"url": "data:,"}}
Ended = list[tuple[GenerationRequest, Finished | Failure]]


def record_ends(engine: Engine) -> Ended:
    """Every request's end, as the engine reports it (after the server's own hooks)."""
    ended: Ended = []
    previous = engine.on_finish

    def on_finish(request: GenerationRequest, result: Finished | Failure) -> None:
        if previous is not None:
            previous(request, result)
        ended.append((request, result))

    engine.on_finish = on_finish
    return ended


def sdk(server: RunningServer, api_key: str = "unused", **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key=api_key, max_retries=0, **options)


@pytest.fixture
async def front() -> AsyncIterator[RunningServer]:
    async with running_server(http_port=0) as server:
        yield server


@pytest.fixture
async def slow_front() -> AsyncIterator[RunningServer]:
    """Each step takes 20 ms: a generation of hundreds of tokens is still running when a test acts."""
    async with running_server(step_delay=0.02, http_port=0) as server:
        yield server


def events(raw: str) -> list[str]:
    """The data of each server-sent event, checking the framing: 'data: <payload>' then a blank line."""
    assert raw.endswith("\n\n"), raw[-80:]
    found = []
    for event in raw[:-2].split("\n\n"):
        assert event.startswith("data: ") and "\n" not in event, event
        found.append(event.removeprefix("data: "))
    return found


# ---- with the openai SDK ----


async def test_models_and_health(front: RunningServer) -> None:
    async with sdk(front) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["fake"]
    async with httpx.AsyncClient(base_url=front.http_url) as http:
        health = await http.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


async def test_a_chat_completion_whole_and_streamed_gives_the_same_text(front: RunningServer) -> None:
    async with sdk(front) as client:
        whole = await client.chat.completions.create(
            model="whatever-the-client-calls-it",
            messages=CHAT,
            max_tokens=6,
            temperature=0,
        )
        stream = await client.chat.completions.create(
            model="fake",
            messages=CHAT,
            max_completion_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "fake" and whole.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert choice.message.content
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (3, 6, 9)

    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    await wait_until_idle(front.engine)  # type: ignore[arg-type]


async def test_completions_default_to_sixteen_tokens_like_openai(front: RunningServer) -> None:
    async with sdk(front) as client:
        whole = await client.completions.create(model="fake", prompt=" hello world")
        stream = await client.completions.create(model="fake", prompt=" hello world", stream=True)
        chunks = [chunk async for chunk in stream]
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage is not None and whole.usage.completion_tokens == 16
    assert whole.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_vllms_ignore_eos_and_min_tokens(front: RunningServer) -> None:
    """Benchmark clients (vLLM's, llama.cpp's) ask for exactly max_tokens with vLLM's extension fields."""
    assert front.engine is not None
    ended = record_ends(front.engine)
    async with sdk(front) as client:
        exact = await client.completions.create(
            model="fake", prompt=" hello world", max_tokens=40, extra_body={"ignore_eos": True}
        )
        await client.completions.create(
            model="fake", prompt=" hello", max_tokens=30, extra_body={"min_tokens": 12}
        )
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(
                model="fake", prompt=" hi", max_tokens=4, extra_body={"min_tokens": -1}
            )
    assert exact.usage is not None and exact.usage.completion_tokens == 40
    assert exact.choices[0].finish_reason == "length"
    assert [request.stopping.ignore_eos for request, _ in ended] == [True, False]
    assert ended[1][0].stopping.min_tokens == 12
    assert caught.value.body["param"] == "min_tokens"  # type: ignore[index]


async def test_a_stop_string_ends_with_finish_reason_stop(front: RunningServer) -> None:
    async with sdk(front) as client:
        free = await client.completions.create(model="fake", prompt=" hello world", max_tokens=8)
        text = free.choices[0].text
        stop = text.split()[3]  # a word from the middle of what it says unhindered
        stopped = await client.completions.create(
            model="fake", prompt=" hello world", max_tokens=8, stop=[stop]
        )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


async def test_logprobs_in_chat_and_completion_shapes(front: RunningServer) -> None:
    async with sdk(front) as client:
        chat = await client.chat.completions.create(
            model="fake",
            messages=CHAT,
            max_tokens=4,
            logprobs=True,
            top_logprobs=1,
        )
        completion = await client.completions.create(
            model="fake", prompt=" hello world", max_tokens=4, logprobs=1
        )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(t.logprob == -0.5 and len(t.top_logprobs) == 1 for t in content)
    assert content[0].bytes == list(content[0].token.encode())
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None and len(logprobs.tokens) == 4
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.token_logprobs == [-0.5] * 4
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


async def test_closing_a_stream_early_stops_the_generation(slow_front: RunningServer) -> None:
    engine = slow_front.engine
    assert engine is not None
    ended = record_ends(engine)
    async with sdk(slow_front) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=CHAT,
            max_tokens=200,
            stream=True,
        )
        seen = 0
        async for chunk in stream:
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 3:
                break
        await stream.close()
        await until(lambda: ended, timeout=2.0, what="the request ended")
    request, result = ended[0]
    assert isinstance(result, Finished) and result.reason is StopReason.CANCELLED
    assert result.usage.completion_tokens < 20  # stopped within a few steps, not at max_tokens
    assert request.request_id == chunk.id
    await wait_until_idle(engine)


async def test_a_bad_parameter_is_a_400_naming_it(front: RunningServer) -> None:
    async with sdk(front) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="fake", messages=CHAT, temperature=500)
        assert bad.value.status_code == 400 and bad.value.param == "temperature"
        assert "temperature" in bad.value.message
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model="fake", messages=CHAT, n=2)
        assert bad.value.param == "n"
        # Fields OpenAI does not know are ignored, as OpenAI ignores them.
        ok = await client.chat.completions.create(
            model="fake",
            messages=CHAT,
            max_tokens=2,
            extra_body={"no_such_field": [1, 2], "user": "me"},
        )
    assert ok.choices[0].finish_reason == "length"
    await wait_until_idle(front.engine)  # type: ignore[arg-type]


# ---- raw HTTP ----


BAD_BODIES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("chat/completions", {"messages": CHAT, "temperature": True}, 400, "temperature"),
    ("chat/completions", {"messages": CHAT, "seed": -1}, 400, "seed"),
    ("chat/completions", {"messages": CHAT, "stop": ""}, 400, "stop"),
    ("chat/completions", {"messages": CHAT, "stop": [1]}, 400, "stop"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": [IMAGE]}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    (
        "chat/completions",
        {"messages": CHAT, "response_format": {"type": "json_object"}},
        400,
        "response_format",
    ),
    ("chat/completions", {"messages": CHAT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    (
        "chat/completions",
        {"messages": CHAT, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    # The engine's own checks: the prompt does not leave room in the fake model's 256-token context.
    ("chat/completions", {"messages": [{"role": "user", "content": " hello" * 300}]}, 400, "messages"),
    ("completions", {"prompt": " hello", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": [" hello", " world"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("completions", {"prompt": " hello", "best_of": 3}, 400, "best_of"),
    ("completions", {"prompt": " hello", "echo": True}, 400, "echo"),
    ("completions", {"prompt": ""}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_BODIES)
async def test_a_bad_field_gives_openais_error_object(
    front: RunningServer, path: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    async with httpx.AsyncClient(base_url=front.http_url) as http:
        answer = await http.post(f"/v1/{path}", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: "), error["message"]
    assert front.engine is not None and front.engine.num_live() == 0


async def test_a_body_that_is_not_json_or_too_large(front: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=front.http_url) as http:
        broken = await http.post("/v1/chat/completions", content=b'{"messages": [')
        deep = await http.post("/v1/chat/completions", content=b"[" * 100_000)
        huge = await http.post("/v1/completions", json={"prompt": "x" * (5 * 1024 * 1024)})
        nowhere = await http.get("/v1/nowhere")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert deep.status_code == 400
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    assert nowhere.status_code == 404 and "error" in nowhere.json()


async def test_sse_framing(front: RunningServer) -> None:
    body = {"messages": CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=front.http_url) as http:
        answer = await http.post("/v1/chat/completions", json=body)
        completion = await http.post(
            "/v1/completions", json={"prompt": " hello", "max_tokens": 3, "stream": True}
        )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["cache-control"] == "no-cache"
    data = events(answer.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])

    data = events(completion.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_hanging_up_on_a_whole_answer_stops_the_generation(slow_front: RunningServer) -> None:
    engine = slow_front.engine
    assert engine is not None
    ended = record_ends(engine)
    async with httpx.AsyncClient(base_url=slow_front.http_url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            await http.post("/v1/completions", json={"prompt": " hello", "max_tokens": 200})
    await until(lambda: ended, timeout=2.0, what="the request ended")
    result = ended[0][1]
    assert isinstance(result, Finished) and result.reason is StopReason.CANCELLED
    assert result.usage.completion_tokens < 40
    await wait_until_idle(engine)


async def test_hanging_up_on_a_raw_stream_stops_the_generation(slow_front: RunningServer) -> None:
    engine = slow_front.engine
    assert engine is not None
    ended = record_ends(engine)
    body = {"messages": CHAT, "max_tokens": 200, "stream": True}
    async with (
        httpx.AsyncClient(base_url=slow_front.http_url) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as answer,
    ):
        async for line in answer.aiter_lines():
            if '"content":" ' in line:
                break
    await until(lambda: ended, timeout=2.0, what="the request ended")
    result = ended[0][1]
    assert isinstance(result, Finished) and result.reason is StopReason.CANCELLED
    await wait_until_idle(engine)


# ---- the same server as gRPC ----


async def test_http_and_grpc_requests_batch_together(slow_front: RunningServer) -> None:
    runner = slow_front.engine.runner  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(slow_front.address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        start = pb.Start(request_id="grpc-1", prompt=" hello", stopping=pb.StoppingParams(max_tokens=30))
        await call.write(pb.GenerateRequest(start=start))
        async with httpx.AsyncClient(base_url=slow_front.http_url) as http:
            answer = await http.post("/v1/completions", json={"prompt": " world", "max_tokens": 30})
        await call.done_writing()
        async for _ in call:
            pass
    assert answer.json()["usage"]["completion_tokens"] == 30
    decodes = [ids for kind, ids in runner.calls if kind == "decode"]
    assert any(len(ids) == 2 for ids in decodes), "no decode step ran the two requests together"  # type: ignore[arg-type]


async def test_a_grpc_cancel_of_an_http_request_gives_finish_reason_abort(slow_front: RunningServer) -> None:
    body = {"messages": CHAT, "max_tokens": 200, "stream": True}
    async with (
        httpx.AsyncClient(base_url=slow_front.http_url) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as answer,
        grpc.aio.insecure_channel(slow_front.address) as channel,
    ):
        lines = answer.aiter_lines()
        first = json.loads((await anext(lines)).removeprefix("data: "))
        # The HTTP request's id is live in its principal's namespace: gRPC Cancel reaches it.
        cancelled = await pb_grpc.TokenWireStub(channel).Cancel(pb.CancelRequest(request_id=first["id"]))
        rest = [line async for line in lines if line]
    assert cancelled.found and cancelled.summary.reason == pb.STOP_REASON_CANCELLED
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"


async def test_the_bearer_token_protects_it_and_names_the_owner() -> None:
    async with running_server(http_port=0, auth_token="s3cret") as server:
        ended = record_ends(server.engine)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            health = await http.get("/health")  # open, like grpc.health.v1
            missing = await http.post("/v1/chat/completions", json={"messages": CHAT})
            wrong = await http.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert health.status_code == 200
        for refused in (missing, wrong):
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
        async with sdk(server, api_key="wrong") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        async with sdk(server, api_key="s3cret") as client:
            answer = await client.chat.completions.create(model="fake", messages=CHAT, max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
        assert [request.owner for request, _ in ended] == ["default"]


async def test_https_with_the_grpc_sides_certificate(certs: Path) -> None:
    tls: dict[str, Any] = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    async with running_server(http_port=0, **tls) as server:
        assert server.http_url.startswith("https://")
        async with httpx.AsyncClient(base_url=server.http_url, verify=str(certs / "ca.pem")) as http:
            answer = await http.post("/v1/completions", json={"prompt": " hello", "max_tokens": 2})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
        plain = server.http_url.replace("https://", "http://")
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"{plain}/health")


async def test_not_serving_while_the_model_loads() -> None:
    server = await serve(None, ServerConfig(host="127.0.0.1", port=0, http_port=0, grace_period_s=0.0))
    try:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            health = await http.get("/health")
            chat = await http.post("/v1/chat/completions", json={"messages": CHAT})
        assert (health.status_code, health.json()) == (503, {"status": "NOT_SERVING"})
        assert chat.status_code == 503 and chat.json()["error"]["type"] == "server_error"
    finally:
        await server.stop(0)


async def test_a_drain_ends_a_live_stream_with_abort_and_done() -> None:
    async with running_server(step_delay=0.02, http_port=0) as server:
        body = {"prompt": " hello", "max_tokens": 200, "stream": True}
        async with (
            httpx.AsyncClient(base_url=server.http_url) as http,
            http.stream("POST", "/v1/completions", json=body) as answer,
        ):
            lines = answer.aiter_lines()
            await anext(lines)
            stopping = asyncio.ensure_future(server.stop(0))
            rest = [line async for line in lines if line]
            await asyncio.wait_for(stopping, 5)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"


async def test_stop_now_ends_a_live_stream_at_once() -> None:
    async with running_server(step_delay=0.02, http_port=0) as server:
        ended = record_ends(server.engine)  # type: ignore[arg-type]
        body = {"messages": CHAT, "max_tokens": 200, "stream": True}
        async with (
            httpx.AsyncClient(base_url=server.http_url) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as answer,
        ):
            lines = answer.aiter_lines()
            await anext(lines)
            await asyncio.wait_for(server.stop_now(), 5)
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
        result = ended[0][1]
        assert isinstance(result, Finished) and result.reason is StopReason.SHUTDOWN


async def test_a_port_in_use_is_a_bind_error_naming_http() -> None:
    port = free_port()
    async with running_server(FAKE_ENGINE, http_port=port) as server:
        assert server.http_port == port
        with pytest.raises(BindError) as taken:
            await serve(None, ServerConfig(host="127.0.0.1", port=0, http_port=port))
    assert taken.value.http and taken.value.in_use


async def test_behind_a_proxy_answers_name_their_replica_and_its_ids_carry_it() -> None:
    """As a gRPC Generate does: so a gRPC Cancel of an HTTP request's id can be routed to its replica."""
    async with (
        running_server(step_delay=0.02, http_port=0, replica_id="r7") as server,
        httpx.AsyncClient(base_url=server.http_url, timeout=30) as http,
    ):
        whole = await http.post("/v1/completions", json={"prompt": " hello", "max_tokens": 2})
        assert whole.headers["x-tokenwire-replica"] == "r7"
        assert whole.json()["id"].startswith("cmpl-r7.")
        body = {"prompt": " hello", "max_tokens": 200, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200 and response.headers["x-tokenwire-replica"] == "r7"
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    request_id = json.loads(line.removeprefix("data: "))["id"]
                    break
            async with grpc.aio.insecure_channel(server.address) as channel:
                cancel = pb.CancelRequest(request_id=request_id)
                replica = (("x-tokenwire-replica", "r7"),)
                assert (await pb_grpc.TokenWireStub(channel).Cancel(cancel, metadata=replica)).found
        assert (await http.get("/health")).headers["x-tokenwire-replica"] == "r7"

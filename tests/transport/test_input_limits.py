"""Bounded input: prompts, Tokenize texts and chats beyond --max-prompt-chars / --max-chat-messages are
refused with INVALID_ARGUMENT naming the field, before the tokenizer ever sees them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import grpc
import pytest

from tests.conftest import FAKE_ENGINE, running_server
from tests.fake_runner import FakeRunner
from tokenwire.service.engine.engine import EngineConfig
from tokenwire.service.main import build_parser, configs_from_args
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

LIMITS = dataclasses.replace(FAKE_ENGINE, max_prompt_chars=1000, max_chat_messages=3)


def recording(server: RunningServer) -> list[int]:
    """Make the server's fake runner record the length of every text it encodes (prompts and chat
    contents alike); returns the list it appends to."""
    assert server.engine is not None
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)
    encoded: list[int] = []
    plain = runner.encode

    def encode(text: str) -> list[int]:
        encoded.append(len(text))
        return plain(text)

    runner.encode = encode  # type: ignore[method-assign]
    return encoded


def chat(*contents: str) -> pb.Chat:
    return pb.Chat(messages=[pb.ChatMessage(role="user", content=c) for c in contents])


async def first_error(call: grpc.aio.StreamStreamCall) -> pb.Error:
    response = await asyncio.wait_for(call.read(), 5)
    while not response.HasField("error"):
        response = await asyncio.wait_for(call.read(), 5)
    return response.error


async def test_a_start_beyond_the_limits_is_refused_before_tokenizing() -> None:
    async with running_server(LIMITS) as server, grpc.aio.insecure_channel(server.address) as ch:
        encoded = recording(server)
        call = pb_grpc.TokenWireStub(ch).Generate()
        stopping = pb.StoppingParams(max_tokens=2)
        refused: Sequence[tuple[pb.Start, str]] = [
            (pb.Start(request_id="p", prompt=" hello" * 200, stopping=stopping), "start.prompt"),
            (
                pb.Start(request_id="m", chat=chat(" a", " b", " c", " d"), stopping=stopping),
                "start.chat.messages",
            ),
            (
                pb.Start(request_id="c", chat=chat(" cat" * 200, " sat" * 100), stopping=stopping),
                "start.chat.messages",
            ),
        ]
        for start, field in refused:
            await call.write(pb.GenerateRequest(start=start))
            error = await first_error(call)
            assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], field), error
            assert "at most" in error.message
        assert encoded == []  # none of them reached the tokenizer
        # At the limits exactly, the same stream goes on serving.
        await call.write(
            pb.GenerateRequest(start=pb.Start(request_id="ok1", prompt="x" * 1000, stopping=stopping))
        )
        await call.write(
            pb.GenerateRequest(
                start=pb.Start(request_id="ok2", chat=chat(" a", " b", " c"), stopping=stopping)
            )
        )
        finished: set[str] = set()
        while len(finished) < 2:
            response = await asyncio.wait_for(call.read(), 5)
            assert not response.HasField("error"), response
            if response.HasField("finished"):
                finished.add(response.request_id)
        await call.done_writing()
        assert 1000 in encoded


async def test_tokenize_beyond_the_limits_is_refused_before_tokenizing() -> None:
    async with running_server(LIMITS) as server, grpc.aio.insecure_channel(server.address) as ch:
        encoded = recording(server)
        stub = pb_grpc.TokenWireStub(ch)
        for request, field in [
            (pb.TokenizeRequest(text="x" * 1001), "text"),
            (pb.TokenizeRequest(chat=chat(" a", " b", " c", " d")), "chat.messages"),
            (pb.TokenizeRequest(chat=chat("x" * 600, "y" * 600)), "chat.messages"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Tokenize(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (caught.value.details() or "").startswith(f"{field}: "), caught.value.details()
        assert encoded == []
        assert len((await stub.Tokenize(pb.TokenizeRequest(text=" hello" * 10))).token_ids) == 10


def test_limits_are_flags_with_documented_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = configs_from_args(build_parser().parse_args([]))
    engine = model.engine_config()
    defaults = EngineConfig()
    assert (engine.max_prompt_chars, engine.max_chat_messages) == (
        defaults.max_prompt_chars,
        defaults.max_chat_messages,
    )
    monkeypatch.setenv("TOKENWIRE_MAX_CHAT_MESSAGES", "7")
    _, model = configs_from_args(build_parser().parse_args(["--max-prompt-chars", "5000"]))
    assert (model.engine_config().max_prompt_chars, model.engine_config().max_chat_messages) == (5000, 7)
    help_text = build_parser().format_help()
    assert "--max-prompt-chars" in help_text and "--max-chat-messages" in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-chat-messages", "0"])

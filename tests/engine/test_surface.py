"""What the engine tells the transport about itself: model info, capacity, and tokenizing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from tests.fake_runner import EOS, FakeRunner, token_id
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    ErrorCode,
    GenerationRequest,
    ModelInfo,
    PromptInput,
    RequestError,
    RequestField,
    StoppingParams,
)
from tokenwire.service.model.types import NotServable


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    # The engine runs 2 at once within the runner's 4 KV rows.
    eng = Engine(FakeRunner(max_batch_size=4, context_length=128), EngineConfig(max_batch_size=2))
    eng.start()
    yield eng
    await eng.stop()


def test_model_info_is_plain_values() -> None:
    runner = FakeRunner(max_batch_size=4, context_length=128)
    runner.dtype = "torch.bfloat16"  # as a torch runner reports it
    info = Engine(runner, EngineConfig(max_batch_size=2, max_live_requests=9)).model_info()
    assert info == ModelInfo(
        name="fake",
        source="tests/fake_runner.py",
        context_length=128,
        vocab_size=runner.vocab_size,
        eos_token_ids=(EOS,),
        device="cpu",
        dtype="bfloat16",
        weights="dense",
        activations="",
        kv_cache_dtype="none",
        has_chat_template=True,
        max_batch_size=2,
        max_live_requests=9,
    )


async def test_kv_slots_and_session_bytes(engine: Engine) -> None:
    assert (engine.kv_slots, engine.kv_slots_in_use, engine.session_cache_bytes) == (4, 0, 0)
    runner = engine.runner
    assert isinstance(runner, FakeRunner)
    admitted, hold = threading.Event(), threading.Event()

    def stall() -> None:
        admitted.set()
        hold.wait(5)

    runner.on_forward = stall
    request = GenerationRequest(
        "s1",
        PromptInput(token_ids=(token_id("Ġhello"),)),
        stopping=StoppingParams(max_tokens=2),
        session_id="conv",
    )
    stream = await engine.submit(request)
    try:
        assert await asyncio.to_thread(admitted.wait, 5)  # its first forward: it holds a row
        assert engine.kv_slots_in_use == 1
    finally:
        hold.set()
    await asyncio.wait_for(stream.result, 5)
    assert engine.kv_slots_in_use == 0 and engine.session_cache_bytes > 0  # the session kept its cache


async def test_tokenize(engine: Engine) -> None:
    tokenized = await engine.tokenize_text(" hello world")
    assert tokenized.token_ids == [token_id("Ġhello"), token_id("Ġworld")]
    assert tokenized.tokens == [" hello", " world"]
    chat = await engine.tokenize_chat((("user", " cat"),))
    assert chat.token_ids == [engine.runner.bos_token_id, token_id("Ġcat")] and chat.tokens[1:] == [" cat"]
    with pytest.raises(RequestError) as caught:
        await engine.tokenize_chat((("robot", " cat"),))
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_ARGUMENT, RequestField.CHAT)
    assert caught.value.message == "cannot apply the chat template: unknown role"


async def test_a_chat_the_server_was_not_started_for_is_a_failed_precondition(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No chat template: the request is fine, the server's configuration is not (FAILED_PRECONDITION),
    for a Start and a Tokenize alike; the message says how to start the server."""

    def no_template(messages: object) -> list[int]:
        raise NotServable("the model has no chat template: start the server with --chat-template FILE")

    monkeypatch.setattr(engine.runner, "encode_chat", no_template)
    chat = PromptInput(chat=(("user", " cat"),))
    for attempt in (engine.tokenize_chat(chat.chat or ()), engine.submit(GenerationRequest("c", chat))):
        with pytest.raises(RequestError) as caught:
            await attempt
        assert (caught.value.code, caught.value.field) == (ErrorCode.FAILED_PRECONDITION, RequestField.CHAT)
        assert "--chat-template" in caught.value.message

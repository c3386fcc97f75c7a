"""Engine.submit: the input is tokenized on the tokenizer thread, with the id (and session) reserved
meanwhile; refusals come in add_request's order, and nothing is left behind when a caller goes away."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest

from tests.fake_runner import FakeRunner, token_id
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    ErrorCode,
    Finished,
    GenerationRequest,
    PromptInput,
    RequestError,
    RequestField,
    StoppingParams,
    StopReason,
)
from tokenwire.service.engine.streams import RequestStream

T = TypeVar("T")
HELLO = token_id("Ġhello")
SLOW = " cat sat"  # the text the tokenizer gets stuck on


class StuckRunner(FakeRunner):
    """Encodes SLOW only once `release` is set (at most 5 s); records the threads that encoded."""

    def __init__(self) -> None:
        super().__init__(max_batch_size=4, context_length=256)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: set[int] = set()

    def encode(self, text: str) -> list[int]:
        self.threads.add(threading.get_ident())
        if text == SLOW:
            self.entered.set()
            if not self.release.wait(5):
                raise RuntimeError("never released")
        return super().encode(text)

    async def wait_until_stuck(self) -> None:
        assert await asyncio.wait_for(asyncio.to_thread(self.entered.wait, 5), 6)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng = Engine(StuckRunner(), EngineConfig(max_batch_size=4, max_live_requests=3))
    eng.start()
    yield eng
    runner(eng).release.set()
    await eng.stop()


def runner(engine: Engine) -> StuckRunner:
    assert isinstance(engine.runner, StuckRunner)
    return engine.runner


def text(request_id: str, prompt: str = SLOW, max_tokens: int = 2, session: str = "") -> GenerationRequest:
    return GenerationRequest(
        request_id,
        PromptInput(text=prompt),
        stopping=StoppingParams(max_tokens=max_tokens),
        session_id=session,
    )


def ids(request_id: str, tokens: tuple[int, ...] = (HELLO,), max_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(
        request_id, PromptInput(token_ids=tokens), stopping=StoppingParams(max_tokens=max_tokens)
    )


async def begun(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task for `work` that has run up to its first wait (submit checks and reserves before that;
    stop stops accepting). A new task's first step is scheduled before our sleep(0) resumes us."""
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)
    return task


async def finish(stream: RequestStream) -> Finished:
    result = await asyncio.wait_for(stream.result, 5)
    assert isinstance(result, Finished)
    return result


async def test_the_tokenizer_runs_off_the_loop_thread(engine: Engine) -> None:
    await finish(await engine.submit(text("a", " hello world")))
    tokenized = await engine.tokenize_text(" hello")
    assert tokenized.tokens == [" hello"] and tokenized.token_ids == [HELLO]
    assert threading.get_ident() not in runner(engine).threads and len(runner(engine).threads) == 1


async def test_the_id_and_the_session_are_reserved_while_tokenizing(engine: Engine) -> None:
    first = asyncio.ensure_future(engine.submit(text("a", session="s")))
    await runner(engine).wait_until_stuck()
    # While "a" is being tokenized the loop takes more: these see its reservation and are refused...
    same_id = await begun(engine.submit(ids("a")))
    same_session = await begun(engine.submit(text("b", " hello", session="s")))
    # ...these reserve their ids and wait for the tokenizer thread, and count against the limit (3).
    waiting = [await begun(engine.submit(ids(rid))) for rid in ("c", "d")]
    over = await begun(engine.submit(ids("e")))
    assert engine.num_live() == 0 and not engine.is_idle()
    # Every one waits for the tokenizer (an invalid input is reported before any other refusal).
    runner(engine).release.set()
    for stream in [await first, *[await w for w in waiting]]:
        await finish(stream)
    for refused, code, field in [
        (same_id, ErrorCode.ALREADY_EXISTS, RequestField.REQUEST_ID),
        (same_session, ErrorCode.FAILED_PRECONDITION, RequestField.SESSION_ID),
        (over, ErrorCode.RESOURCE_EXHAUSTED, None),
    ]:
        with pytest.raises(RequestError) as caught:
            await refused
        assert (caught.value.code, caught.value.field) == (code, field)


async def test_invalid_input_is_reported_before_a_taken_id(engine: Engine) -> None:
    """As add_request does: a model-level INVALID_ARGUMENT comes before ALREADY_EXISTS."""
    hold = threading.Event()
    runner(engine).on_forward = lambda: hold.wait(5)  # "dup" stays live: its prefill waits for `hold`
    live = await engine.submit(ids("dup"))
    for request, field in [
        (ids("dup", (9999,)), RequestField.TOKEN_IDS),
        (ids("dup", (HELLO,) * 10, max_tokens=250), RequestField.MAX_TOKENS),
        (GenerationRequest("dup", PromptInput(chat=(("robot", "hi"),))), RequestField.CHAT),
    ]:
        with pytest.raises(RequestError) as caught:
            await engine.submit(request)
        assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_ARGUMENT, field)
    hold.set()
    await finish(live)


async def test_a_caller_that_goes_away_gives_its_reservation_back(engine: Engine) -> None:
    pending = asyncio.ensure_future(engine.submit(text("gone")))
    await runner(engine).wait_until_stuck()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    runner(engine).release.set()
    assert engine.is_idle()
    await finish(await engine.submit(text("gone")))  # the id is free


async def test_stopping_while_tokenizing_refuses_the_request(engine: Engine) -> None:
    pending = asyncio.ensure_future(engine.submit(text("late")))
    await runner(engine).wait_until_stuck()
    queued = await begun(engine.submit(ids("queued")))  # waits behind "late" for the tokenizer thread
    queued_tokenize = await begun(engine.tokenize_text(" hello"))
    stopping = await begun(engine.stop())
    assert not engine.accepting
    # stop drops the queued work (while "late" still holds the thread): each gets a refusal it can
    # act on, not a bare cancellation
    await asyncio.wait({queued, queued_tokenize}, timeout=5)
    runner(engine).release.set()
    for refused in (pending, queued, queued_tokenize):
        with pytest.raises(RequestError) as caught:
            await asyncio.wait_for(refused, 5)
        assert caught.value.code is ErrorCode.UNAVAILABLE
    await asyncio.wait_for(stopping, 10)
    assert engine.is_idle()
    with pytest.raises(RequestError) as caught:
        await engine.tokenize_text(" hello")
    assert caught.value.code is ErrorCode.UNAVAILABLE


async def test_a_cancel_while_tokenizing_finds_the_request_and_stops_it_once_live(engine: Engine) -> None:
    """A Cancel from another connection right after a Start must not miss it because its input is
    still being tokenized: it is found, and the request ends CANCELLED, having generated nothing."""
    pending = asyncio.ensure_future(engine.submit(text("early", max_tokens=50)))
    await runner(engine).wait_until_stuck()
    cancelling = await begun(engine.cancel("early"))
    assert engine.abort("early", StopReason.INTERRUPTED)  # found too; the first stop wins
    runner(engine).release.set()
    summary = await asyncio.wait_for(cancelling, 5)
    assert summary is not None and summary.reason is StopReason.CANCELLED
    assert summary.usage.completion_tokens == 0
    assert await finish(await pending) == summary
    assert await engine.cancel("early") is None  # over: not found any more


async def test_a_cancel_of_a_request_refused_after_tokenizing_finds_nothing(engine: Engine) -> None:
    pending = asyncio.ensure_future(engine.submit(text("refused", max_tokens=1000)))  # past the context
    await runner(engine).wait_until_stuck()
    cancelling = await begun(engine.cancel("refused"))
    runner(engine).release.set()
    assert await asyncio.wait_for(cancelling, 5) is None
    with pytest.raises(RequestError):
        await pending
    assert engine.is_idle()


async def test_an_abort_queued_after_the_step_took_its_requests_still_applies() -> None:
    """The step takes new requests, then applies aborts; a request and its abort that arrive between
    the two must not lose the abort (a Cancel right after a Start, or one kept while tokenizing)."""
    engine = Engine(StuckRunner(), EngineConfig(max_batch_size=4))  # not started: the test is the step
    engine.healthy = lambda: True  # type: ignore[method-assign]
    stream = engine.add_request(ids("raced", max_tokens=20))
    assert engine.abort("raced", StopReason.CANCELLED)
    outputs: list = []
    engine._apply_aborts(0.0, outputs)  # as if _take_incoming had run just before the request came
    finished = [item for _, item in outputs if isinstance(item, Finished)]
    assert [f.reason for f in finished] == [StopReason.CANCELLED]
    assert all(target is stream for target, _ in outputs)

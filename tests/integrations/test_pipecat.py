"""TokenWireLLMService in a real Pipecat pipeline (a source, the service, a recording sink; no audio)
against a real tokenwire server on 127.0.0.1: a full turn, a barge-in, the session turn after it, a
server that dies mid-turn, and the default model end to end."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
)
from pipecat.metrics.metrics import LLMUsageMetricsData, TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import LLMSettings

from tests.conftest import running_server, wait_until_idle
from tests.fake_runner import FakeRunner, token_id
from tests.waiting import until
from tokenwire.client import StopReason
from tokenwire.integrations.pipecat import TokenWireLLMService
from tokenwire.service.engine.engine import Engine
from tokenwire.service.transport.server import RunningServer

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "hello the cat"  # words the fake tokenizer knows
WAIT_S = 10.0


def words(text: str) -> list[int]:
    return [token_id(w) for w in text.split()]


# One sentence, then a second that never ends (until max_tokens): after the first sentence frame the
# server holds the rest back, so nothing is in flight when the barge-in comes. (A sentence is cut once
# the next one has begun with a capital: "world. the" may still be one sentence.)
ONE_SENTENCE_THEN_MORE = words("Ġhello Ġworld . ĠDr ĠSmith Ġsat") + words("Ġon Ġthe Ġmat") * 40


class Recorder(FrameProcessor):
    """Records every frame it sees in one direction and passes everything on."""

    def __init__(self, direction: FrameDirection, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._direction = direction
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self._direction:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]

    def text(self) -> str:
        return "".join(f.text for f in self.of(LLMTextFrame))

    def metrics(self, kind: type[Any]) -> list[Any]:
        return [d for f in self.of(MetricsFrame) for d in f.data if isinstance(d, kind)]


class Bot:
    """A running pipeline: source (records upstream frames, e.g. errors) -> service -> sink."""

    def __init__(self, llm: TokenWireLLMService) -> None:
        self.llm = llm
        self.source = Recorder(FrameDirection.UPSTREAM, name="source")
        self.sink = Recorder(FrameDirection.DOWNSTREAM, name="sink")
        self.task = PipelineTask(
            Pipeline([self.source, llm, self.sink]),
            params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
            cancel_on_idle_timeout=False,
        )
        self.context = LLMContext()

    async def say(self, text: str) -> None:
        """A user turn: append it to the context and hand the context to the service."""
        self.context.add_message({"role": "user", "content": text})
        await self.task.queue_frame(LLMContextFrame(self.context))

    async def responses_ended(self, n: int) -> None:
        await until(lambda: len(self.sink.of(LLMFullResponseEndFrame)) >= n, WAIT_S, f"{n} response ends")


@contextlib.asynccontextmanager
async def bot(address: str, **options: Any) -> AsyncIterator[Bot]:
    running = Bot(TokenWireLLMService(address=address, **options))
    runner = PipelineRunner(handle_sigint=False)
    await runner.add_workers(running.task)
    run = asyncio.create_task(runner.run())
    try:
        yield running
    finally:
        await running.task.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(run), WAIT_S)
        except asyncio.TimeoutError:
            await running.task.cancel()
            await asyncio.wait_for(run, WAIT_S)


def fake(server: RunningServer) -> FakeRunner:
    assert server.engine is not None and isinstance(server.engine.runner, FakeRunner)
    return server.engine.runner


def engine_of(server: RunningServer) -> Engine:
    assert server.engine is not None
    return server.engine


class StepWatch:
    """Counts the server's finished steps; notes the count when an abort arrives and at each finish."""

    def __init__(self, engine: Engine) -> None:
        self.steps = 0
        self.aborts: list[int] = []
        self.finishes: list[tuple[str, int]] = []
        on_step, on_finish, abort = engine.on_step, engine.on_finish, engine.abort

        def step(*args: Any) -> None:
            if on_step is not None:
                on_step(*args)
            self.steps += 1

        def finish(request: Any, result: Any) -> None:
            if on_finish is not None:
                on_finish(request, result)
            self.finishes.append((getattr(getattr(result, "reason", None), "name", "FAILURE"), self.steps))

        def aborted(*args: Any, **kwargs: Any) -> Any:
            self.aborts.append(self.steps)
            return abort(*args, **kwargs)

        engine.on_step, engine.on_finish = step, finish
        engine.abort = aborted  # type: ignore[method-assign]


async def interrupt_after_first_sentence(b: Bot) -> None:
    await until(lambda: b.sink.of(LLMTextFrame), WAIT_S, "the first sentence frame")
    await b.task.queue_frame(InterruptionFrame())
    await until(lambda: b.llm.last_interrupt is not None, WAIT_S, "the acknowledged stop")
    await b.responses_ended(1)
    # The interruption reaches the sink through the pipeline too, after the service let it by.
    await until(lambda: b.sink.of(InterruptionFrame), WAIT_S, "the interruption at the sink")


# ---- the turns ----


async def test_a_full_turn_streams_sentences_between_start_and_end_frames() -> None:
    async with running_server() as server:
        fake(server).script[fake(server).bos_token_id] = words("Ġhello Ġworld . ĠDr ĠSmith Ġsat .")
        async with bot(server.address) as b:
            await b.say(QUESTION)
            await b.responses_ended(1)
            kinds = [
                type(f)
                for f in b.sink.frames
                if isinstance(f, LLMFullResponseStartFrame | LLMTextFrame | LLMFullResponseEndFrame)
            ]
            assert kinds == [LLMFullResponseStartFrame, LLMTextFrame, LLMTextFrame, LLMFullResponseEndFrame]
            assert [f.text for f in b.sink.of(LLMTextFrame)] == [" hello world.", " Dr Smith sat."]
            result = b.llm.last_result
            assert result is not None and result.reason is StopReason.EOS
            usage = b.sink.metrics(LLMUsageMetricsData)
            assert len(usage) == 1 and usage[0].value.completion_tokens == result.usage.completion_tokens
            assert usage[0].value.prompt_tokens == result.usage.prompt_tokens > 0
            # The task reports a zero for every service at its start; then one measured TTFB.
            assert len([m for m in b.sink.metrics(TTFBMetricsData) if m.value > 0]) == 1
            assert not b.source.of(ErrorFrame)
        await wait_until_idle(engine_of(server))


async def test_an_interruption_stops_the_server_within_a_step_and_matches_the_text_frames() -> None:
    async with running_server(step_delay=0.02) as server:
        fake(server).script[fake(server).bos_token_id] = ONE_SENTENCE_THEN_MORE
        watch = StepWatch(engine_of(server))
        async with bot(server.address, interrupt_timeout_s=2.0) as b:
            await b.say(QUESTION)
            await interrupt_after_first_sentence(b)
            stats = b.llm.last_interrupt
            assert stats is not None and stats.acknowledged and stats.result is not None
            assert stats.result.reason is StopReason.INTERRUPTED
            assert stats.result.tail_text.startswith(" Dr Smith")  # generated, held back, never sent
            # What the pipeline got as text frames is exactly what the server says it sent.
            assert b.sink.text() == " hello world."
            assert stats.result.sent_text_chars == len(b.sink.text()) == stats.pushed_chars
            # No text after the interruption; the response was closed.
            cut = next(i for i, f in enumerate(b.sink.frames) if isinstance(f, InterruptionFrame))
            assert not [f for f in b.sink.frames[cut:] if isinstance(f, LLMTextFrame)]
            assert len(b.sink.of(LLMFullResponseEndFrame)) == 1
            # The server ended it at most one step after the Interrupt arrived.
            assert len(watch.aborts) == 1 and len(watch.finishes) == 1
            reason, at_step = watch.finishes[0]
            assert reason == "INTERRUPTED" and at_step - watch.aborts[0] <= 1, (watch.aborts, watch.finishes)
            assert engine_of(server).num_live() == 0
            assert not b.source.of(ErrorFrame)
        await wait_until_idle(engine_of(server))


async def test_after_segment_finishes_the_sentence_on_the_server_but_pushes_nothing_more() -> None:
    async with running_server(step_delay=0.02) as server:
        # Two sentences, then one that never ends: the barge-in comes while the second is generated.
        sentences = "Ġhello Ġworld . ĠDr ĠSmith Ġsat Ġon Ġthe Ġmat . ĠDr ĠSmith"
        fake(server).script[fake(server).bos_token_id] = words(sentences) + words("Ġon Ġthe Ġmat") * 40
        async with bot(server.address, interrupt_mode="after_segment", interrupt_timeout_s=2.0) as b:
            await b.say(QUESTION)
            await interrupt_after_first_sentence(b)
            stats = b.llm.last_interrupt
            assert stats is not None and stats.acknowledged and stats.result is not None
            assert stats.result.reason is StopReason.INTERRUPTED
            # The server finished the sentence under way; the pipeline, already cut off, got none of it.
            assert stats.result.text == " hello world. Dr Smith sat on the mat."
            assert b.sink.text() == " hello world." and stats.pushed_chars == len(" hello world.")
        await wait_until_idle(engine_of(server))


async def test_the_turn_after_an_interruption_holds_only_what_was_heard_and_reuses_the_cache() -> None:
    async with running_server(step_delay=0.02) as server:
        fake(server).script[fake(server).bos_token_id] = ONE_SENTENCE_THEN_MORE
        options: dict[str, Any] = {"use_session": True, "settings": LLMSettings(max_tokens=6)}
        async with bot(server.address, interrupt_timeout_s=2.0, **options) as b:
            await b.say(QUESTION)
            await interrupt_after_first_sentence(b)
            session_id = b.llm.session_id
            assert session_id
            # The pipeline's record of the reply (what its assistant aggregator saw spoken) is shorter
            # than what was pushed: the TTS had said only "hello" when the user cut in.
            b.context.add_message({"role": "assistant", "content": "hello"})
            await b.say("the mat")
            await b.responses_ended(2)
            assert b.llm.session_id == session_id  # the same session went on
            result = b.llm.last_result
            assert result is not None and result.reason is StopReason.MAX_TOKENS
            assert result.cached_prompt_tokens > 0
            usage = b.sink.metrics(LLMUsageMetricsData)[-1].value
            assert usage.cache_read_input_tokens == result.cached_prompt_tokens
            # The server's history: the first question, the reply cut to what was heard, then only the
            # new turn (not the whole context again), then its reply.
            sessions = engine_of(server).sessions._sessions
            (history,) = [s.chat for (_, sid), s in sessions.items() if sid == session_id]
            assert history == [
                ("user", QUESTION),
                ("assistant", " hello"),
                ("user", "the mat"),
                ("assistant", result.text),
            ]
            assert not b.source.of(ErrorFrame)
        await wait_until_idle(engine_of(server))


async def test_a_session_the_server_lost_is_started_again_from_the_whole_context() -> None:
    async with running_server(step_delay=0.002) as server:
        options: dict[str, Any] = {"use_session": True, "settings": LLMSettings(max_tokens=4)}
        async with bot(server.address, **options) as b:
            await b.say(QUESTION)
            await b.responses_ended(1)
            first = b.llm.session_id
            b.context.add_message({"role": "assistant", "content": b.llm.last_result.text})  # type: ignore[union-attr]
            engine_of(server).sessions._sessions.clear()  # expired, evicted, or another replica took it
            await b.say("the mat")
            await b.responses_ended(2)
            # Refused with NOT_FOUND (continue_session), then sent whole in a new session: no error frame,
            # and the server's new history is the whole conversation, not the last message alone.
            assert b.llm.session_id and b.llm.session_id != first
            sessions = engine_of(server).sessions._sessions
            (history,) = [s.chat for (_, sid), s in sessions.items() if sid == b.llm.session_id]
            assert [role for role, _ in history] == ["user", "assistant", "user", "assistant"]
            assert not b.source.of(ErrorFrame)
        await wait_until_idle(engine_of(server))


async def test_a_server_that_dies_mid_turn_gives_an_error_frame_and_no_hang() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.server_main", "--step-delay", "0.05", "--batch", "2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
        assert line.startswith("PORT "), line
        async with bot(f"127.0.0.1:{line.split()[1]}", chunking="word") as b:
            await b.say(QUESTION)
            await until(lambda: b.sink.of(LLMTextFrame), WAIT_S, "the first text frame")
            process.kill()
            began = time.monotonic()
            await b.responses_ended(1)
            await until(lambda: b.source.of(ErrorFrame), WAIT_S, "an error frame upstream")
            assert time.monotonic() - began < 5.0
            (error,) = b.source.of(ErrorFrame)
            assert error.error.startswith("tokenwire: ")
    finally:
        process.kill()
        process.wait(10)


# ---- the default model ----


@pytest.mark.model
async def test_the_default_model_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    """One turn on the real model: time to the first sentence frame, and a barge-in's acknowledgement."""
    from tokenwire.service.engine.engine import EngineConfig
    from tokenwire.service.model.runner import ModelRunner  # torch: only in this test
    from tokenwire.service.transport.server import ServerConfig, serve

    runner = await asyncio.to_thread(ModelRunner.load, "default", max_batch_size=2, max_context=1024)
    await asyncio.to_thread(runner.warm_up)
    engine = Engine(runner, EngineConfig(max_batch_size=2))
    engine.start()
    server = await serve(engine, ServerConfig(host="127.0.0.1", port=0, grace_period_s=0.0))
    try:
        async with bot(server.address, use_session=True, settings=LLMSettings(max_tokens=200)) as b:
            began = time.monotonic()
            await b.say("Tell me about the history of lighthouses, in several sentences.")
            await until(lambda: b.sink.of(LLMTextFrame), 60, "the first sentence frame")
            first_sentence_s = time.monotonic() - began
            await b.task.queue_frame(InterruptionFrame())
            await until(lambda: b.llm.last_interrupt is not None, WAIT_S, "the acknowledged stop")
            stats = b.llm.last_interrupt
            assert stats is not None and stats.acknowledged and stats.result is not None
            assert stats.result.reason in (StopReason.INTERRUPTED, StopReason.EOS)
            assert stats.result.sent_text_chars >= stats.pushed_chars == len(b.sink.text()) > 0
            b.context.add_message({"role": "assistant", "content": b.sink.text()})
            await b.say("Who built the first one?")
            await b.responses_ended(2)
            assert b.llm.last_result is not None and b.llm.last_result.cached_prompt_tokens > 0
        await wait_until_idle(engine, timeout=10)
    finally:
        await server.stop(0)
    with capsys.disabled():
        print(
            f"\npipecat + default model: first sentence frame {first_sentence_s * 1000:.0f} ms after the"
            f" turn; interruption -> acknowledged stop {stats.seconds_to_ack * 1000:.1f} ms"
        )

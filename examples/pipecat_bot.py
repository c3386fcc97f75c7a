"""A text-in, text-out Pipecat bot on tokenwire: type a line to talk, an empty line to barge in.

    make serve                                   # in one terminal
    .venv/bin/python examples/pipecat_bot.py [ADDRESS]

The pipeline is Pipecat's (a PipelineTask with TokenWireLLMService and a processor that prints), with
the microphone and the speaker left out: each line you type is a user turn, each sentence the model
says is printed as it arrives. An empty line while the bot talks is a barge-in: the service sends an
Interrupt on its tokenwire stream, the server stops at its next decode step and says how much text it
had sent. Typing a new line while the bot talks interrupts it too, then asks the new question. The
conversation lives in a tokenwire session, cut after a barge-in to what was shown, so each turn only
prefills its new tokens. Ctrl-D (end of input) lets the last reply finish, then quits.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import LLMSettings

from tokenwire.integrations.pipecat import TokenWireLLMService

SYSTEM = "You are a friendly assistant. Answer in a few short sentences."


class Printer(FrameProcessor):
    """Stands in for text-to-speech and the speaker: prints each sentence, and records what was shown
    in the context (as Pipecat's assistant aggregator would)."""

    def __init__(self, llm: TokenWireLLMService, context: LLMContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._llm = llm
        self._context = context
        self._shown: list[str] = []
        self._interrupt_seen: object = None
        self.idle = asyncio.Event()  # cleared while a reply is under way
        self.idle.set()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self._shown = []
        elif isinstance(frame, LLMTextFrame):
            self._shown.append(frame.text)
            print(f"bot: {frame.text.strip()}", flush=True)
        elif isinstance(frame, LLMFullResponseEndFrame):
            self._ended()
        await self.push_frame(frame, direction)

    def _ended(self) -> None:
        shown = "".join(self._shown)
        self._context.add_message({"role": "assistant", "content": shown})
        stats = self._llm.last_interrupt
        if stats is not None and stats is not self._interrupt_seen and stats.result is not None:
            self._interrupt_seen = stats
            result = stats.result
            took_ms = stats.seconds_to_ack * 1000
            print(
                f"(interrupted: the server stopped with {result.reason} in {took_ms:.1f} ms;"
                f" {result.sent_text_chars} characters sent, {len(shown)} shown)",
                flush=True,
            )
        elif self._llm.last_result is not None:
            result = self._llm.last_result
            print(
                f"(done: {result.reason}, {result.usage.completion_tokens} tokens,"
                f" {result.cached_prompt_tokens} of {result.prompt_tokens} prompt tokens cached)",
                flush=True,
            )
        self.idle.set()


async def read_lines(queue: asyncio.Queue[str | None]) -> None:
    """stdin, line by line, without blocking the event loop; None at end of input."""
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        await queue.put(line.rstrip("\n") if line else None)
        if not line:
            return


async def main(address: str) -> None:
    logger.remove()  # Pipecat logs every step at DEBUG: keep the terminal for the conversation
    logger.add(sys.stderr, level="WARNING")
    llm = TokenWireLLMService(
        address=address,
        chunking="sentence",
        use_session=True,
        settings=LLMSettings(system_instruction=SYSTEM, max_tokens=200, temperature=0.7),
    )
    context = LLMContext()
    printer = Printer(llm, context)
    task = PipelineTask(Pipeline([llm, printer]), params=PipelineParams(enable_metrics=True))
    runner = PipelineRunner(handle_sigint=True)
    await runner.add_workers(task)
    running = asyncio.create_task(runner.run())
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    reader = asyncio.create_task(read_lines(lines))
    print("type a line to talk; an empty line while the bot talks interrupts it; Ctrl-D quits", flush=True)
    while (line := await lines.get()) is not None:
        if not printer.idle.is_set():
            print("(barge-in)", flush=True)
            await task.queue_frame(InterruptionFrame())
            await printer.idle.wait()
        if line.strip():
            printer.idle.clear()
            context.add_message({"role": "user", "content": line})
            await task.queue_frame(LLMContextFrame(context))
    await printer.idle.wait()
    await task.queue_frame(EndFrame())
    await running
    reader.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))

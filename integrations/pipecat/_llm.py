"""TokenWireLLMService: a Pipecat LLM service over one tokenwire Generate stream, with acknowledged barge-in.

It sits where Pipecat's OpenAILLMService would: it takes LLMContextFrames and answers each with
LLMFullResponseStartFrame, LLMTextFrames and LLMFullResponseEndFrame, plus TTFB, processing and token
usage metrics. Every turn is one generation on a single long-lived tokenwire stream
(`AsyncClient.stream()`), opened on the first turn and reopened after a failure.

Barge-in. Pipecat answers an InterruptionFrame by cancelling the task that processes the context
frame. The cancellation reaches the turn while it reads the stream; the service then sends an
Interrupt on the stream (IMMEDIATE, or AFTER_SEGMENT) and waits, at most `interrupt_timeout_s`, for the
server's acknowledged stop (its Finished message), which says how much text it had sent. Should the
acknowledgement not come in time (or the wait itself be cancelled), the whole stream is cancelled,
which stops every generation on it server-side; the next turn opens a new one. So no path out of a
turn leaves a generation running. Chunks that arrive after the interruption are never pushed: Pipecat
has already cut the bot off, and text pushed then would be taken for the next response.

Sessions (`use_session=True`). Pipecat hands over the whole conversation every turn; with a session
the server keeps it (and its KV cache) instead, so the service sends only the turn's new messages and
the next turn prefills only those (`cached_prompt_tokens` in the usage metrics). After a barge-in the
server's copy of the reply is cut to what was heard before the next turn goes on: the text the service
pushed before the interruption, or less when the pipeline's own record of the reply says so (the
assistant message Pipecat's context aggregator adds holds what the TTS actually spoke). When the
context stops extending what the session holds (edited, reset), a new session starts from the whole
context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from pipecat.frames.frames import (
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
)
from pipecat.metrics.metrics import LLMTokenUsage
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.llm_service import LLMService
from pipecat.services.settings import LLMSettings
from pipecat.utils.types import is_given

from tokenwire.client import (
    AsyncClient,
    AsyncGeneration,
    AsyncStream,
    Chunking,
    InterruptMode,
    NotFound,
    Result,
    StopReason,
    TokenWireError,
)

from ._conversation import Reply, SessionLedger, chat_turns

__all__ = ["InterruptStats", "TokenWireLLMService"]

log = logging.getLogger("tokenwire.integrations.pipecat")

DEFAULT_INTERRUPT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class InterruptStats:
    """One barge-in, as the service saw it (`TokenWireLLMService.last_interrupt`)."""

    request_id: str
    acknowledged: bool  # the server's Finished came within the bound (else the stream was cancelled)
    seconds_to_ack: float  # from the InterruptionFrame reaching the service to the acknowledgement
    pushed_chars: int  # text pushed downstream before the interruption
    result: Result | None  # the server's acknowledged stop (reason, sent_text_chars, tail_text)


class TokenWireLLMService(LLMService):  # type: ignore[misc]  # pipecat's classes are untyped for mypy here
    """A Pipecat LLM service that generates with a tokenwire server.

        llm = TokenWireLLMService(address="127.0.0.1:50051", chunking="sentence", use_session=True)
        pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, transport.output(),
                             assistant_aggregator])

    `chunking` ("sentence", "clause", "word", "token"; None: the server's default, token) sets how the
    server cuts text into LLMTextFrames. With "sentence" or "clause" each frame is a whole segment;
    give the TTS service `text_aggregation_mode=TextAggregationMode.TOKEN` then, since its own
    sentence aggregator holds each finished sentence back until the next one starts. `interrupt_mode`
    is what an interruption sends ("immediate", "after_segment"), `interrupt_timeout_s` how long it
    waits for the acknowledgement before cancelling the stream. `use_session` keeps the conversation in
    a tokenwire session (see the module docstring). Settings map onto tokenwire's options: model is
    informational (the server serves one), temperature, top_p, top_k, seed and max_tokens pass through,
    frequency and presence penalties are not supported (ignored), and `extra` may hold any other
    `tokenwire.client.GenerateOptions` key (repetition_penalty, min_p, stop, time_limit_ms, ...).
    Tool calls are not supported: tool messages in the context are left out."""

    Settings = LLMSettings

    def __init__(
        self,
        *,
        address: str = "127.0.0.1:50051",
        client: AsyncClient | None = None,
        settings: LLMSettings | None = None,
        chunking: Chunking | str | None = Chunking.SENTENCE,
        interrupt_mode: InterruptMode | str = InterruptMode.IMMEDIATE,
        interrupt_timeout_s: float = DEFAULT_INTERRUPT_TIMEOUT_S,
        use_session: bool = False,
        **kwargs: Any,
    ) -> None:
        store = LLMSettings(
            model="tokenwire",
            system_instruction=None,
            temperature=None,
            max_tokens=None,
            top_p=None,
            top_k=None,
            frequency_penalty=None,
            presence_penalty=None,
            seed=None,
            filter_incomplete_user_turns=False,
            user_turn_completion_config=None,
            extra={},
        )
        if settings is not None:
            store.apply_update(settings)
        super().__init__(settings=store, **kwargs)
        self._client = client if client is not None else AsyncClient(address)
        self._owns_client = client is None
        self._chunking = Chunking(chunking) if chunking is not None else None
        self._interrupt_mode = InterruptMode(interrupt_mode)
        self._interrupt_timeout_s = interrupt_timeout_s
        self._use_session = use_session
        self._ledger = SessionLedger()
        self._stream: AsyncStream | None = None
        self._interrupted_at: float | None = None
        self.last_interrupt: InterruptStats | None = None
        """The most recent barge-in: whether and how fast the server acknowledged it."""
        self.last_result: Result | None = None
        """The server's Result of the most recent turn that ended (normally or interrupted)."""

    def can_generate_metrics(self) -> bool:
        return True

    @property
    def session_id(self) -> str:
        """The tokenwire session the conversation is kept in ("" without one, or before the first turn)."""
        return self._ledger.session_id

    # ---- frames ----

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        if isinstance(frame, InterruptionFrame):
            # Before the base class cancels the running turn: the barge-in is timed from here.
            self._interrupted_at = time.monotonic()
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            await self.push_frame(LLMFullResponseStartFrame())
            await self.start_processing_metrics()
            try:
                await self._process_context(frame.context)
            except TokenWireError as error:
                await self.push_error(error_msg=f"tokenwire: {error}", exception=error)
            finally:
                await self.stop_processing_metrics()
                await self.push_frame(LLMFullResponseEndFrame())
        else:
            await self.push_frame(frame, direction)

    async def stop(self, frame: Any) -> None:
        await super().stop(frame)
        await self._close()

    async def cancel(self, frame: Any) -> None:
        await super().cancel(frame)
        await self._close()

    # ---- one turn ----

    async def _process_context(self, context: LLMContext) -> None:
        adapter = self.get_llm_adapter()
        params = await adapter.get_llm_invocation_params(
            context,
            system_instruction=self._settings.system_instruction or None,
            convert_developer_to_user=False,
        )
        messages = chat_turns(params["messages"])
        turns, options = messages, self._options()
        if self._use_session:
            turns, options = self._session_turn(messages, options)
        await self.start_ttfb_metrics()
        while True:
            generation = await self._start_generation(turns, options)
            pushed: list[str] = []
            try:
                async for chunk in generation:
                    if not pushed:
                        await self.stop_ttfb_metrics()
                    pushed.append(chunk.text)
                    await self._push_llm_text(chunk.text)
            except asyncio.CancelledError:
                await self._interrupt_generation(generation, "".join(pushed))
                raise
            except NotFound:
                if pushed or not options.get("continue_session"):
                    self._fail()
                    raise
                # The server no longer holds the session (expired, evicted, another replica): the
                # whole context again, in a new session.
                self._ledger.forget()
                turns, options = self._session_turn(messages, self._options())
                continue
            except TokenWireError:
                self._fail()
                raise
            break
        if not pushed:
            await self.stop_ttfb_metrics()  # a reply without text: its Finished is the first answer
        result = generation.result
        await self._report(result, "".join(pushed))
        if result.reason is StopReason.SHUTDOWN:
            # The server went away mid-reply (drained): the reply is cut short, as with a failure.
            self._fail()
            await self.push_error(error_msg="tokenwire: the server shut down before the reply ended")

    def _session_turn(
        self, messages: list[tuple[str, str]], options: dict[str, Any]
    ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """What to send of the context's messages with a session, and the options for it: only the new
        messages when the session goes on (then the server must still hold it: continue_session)."""
        turns, truncate = self._ledger.next_turn(messages)
        options["session_id"] = self._ledger.session_id
        options["continue_session"] = len(turns) < len(messages)
        if truncate is not None:
            options["truncate_reply_chars"] = truncate
        return turns, options

    async def _interrupt_generation(self, generation: AsyncGeneration, pushed: str) -> None:
        """The turn was cancelled (an interruption, or the pipeline stopping): interrupt the generation
        and wait, within the bound, for the acknowledgement; otherwise cancel the stream."""
        interrupted_at = self._interrupted_at or time.monotonic()
        self._interrupted_at = None
        result: Result | None = None
        try:
            result = await asyncio.wait_for(
                generation.interrupt(self._interrupt_mode), self._interrupt_timeout_s
            )
        except (TimeoutError, asyncio.TimeoutError, TokenWireError, RuntimeError) as error:
            log.warning("tokenwire: no acknowledged stop for %s (%r): cancelling the stream",
                        generation.request_id, error)  # fmt: skip
        finally:
            if result is None:
                self._fail()  # cancels the stream: every generation on it stops server-side
        self.last_interrupt = InterruptStats(
            generation.request_id, result is not None, time.monotonic() - interrupted_at, len(pushed), result
        )
        if result is None:
            return
        with contextlib.suppress(Exception):  # metrics must not turn an interruption into an error
            await self._report(result, pushed)

    async def _report(self, result: Result, pushed: str) -> None:
        self.last_result = result
        if self._use_session:
            if result.reason is StopReason.ERROR:
                self._ledger.forget()
            else:
                self._ledger.replied(Reply(result.sent_text_chars, pushed))
        usage = result.usage
        await self.start_llm_usage_metrics(
            LLMTokenUsage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cache_read_input_tokens=usage.cached_prompt_tokens,
            )
        )

    def _options(self) -> dict[str, Any]:
        settings = self._settings
        options: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "seed", "max_tokens"):
            value = getattr(settings, name)
            if is_given(value) and value is not None:
                options[name] = value
        if self._chunking is not None:
            options["chunking"] = self._chunking
        if is_given(settings.extra) and settings.extra:
            options.update(settings.extra)
        return options

    # ---- the stream ----

    async def _start_generation(
        self, turns: list[tuple[str, str]], options: dict[str, Any]
    ) -> AsyncGeneration:
        """Start the turn's generation on the service's stream (opened now if there is none)."""
        reused = self._stream is not None
        for attempt in (1, 2):
            if self._stream is None:
                self._stream = self._client.stream()
                reused = False
            stream = self._stream
            try:
                return await stream.start(messages=turns, **options)
            except (TokenWireError, RuntimeError):
                # A stream that ended while idle (a server restart between turns) cannot take the
                # Start: try once more on a new one.
                self._fail()
                if not reused or attempt == 2:
                    raise
            except asyncio.CancelledError:
                self._fail()  # the Start may have gone out without its handle: stop it with the RPC
                raise
        raise AssertionError("unreachable")

    def _fail(self) -> None:
        """The stream failed or cannot be trusted: cancel it (every generation on it stops
        server-side) and forget the session, which may not hold the turn."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        self._ledger.forget()

    async def _close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await asyncio.wait_for(stream.aclose(), self._interrupt_timeout_s)
            except (TimeoutError, asyncio.TimeoutError, TokenWireError):
                stream.cancel()
        if self._owns_client:
            await self._client.aclose()

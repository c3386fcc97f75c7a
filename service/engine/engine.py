"""The bridge between asyncio and the step thread: requests in, per-request output streams out.

One background thread runs `step()` in a loop: apply queued aborts, let the scheduler admit and
plan, run the prefill chunks and ONE batched decode, then hand every request its new tokens. The
thread never touches asyncio objects directly: each step's outputs go to the event loop in one
`call_soon_threadsafe`. Every way a request can end goes through `_finish`, exactly once. A second
thread, the tokenizer's, turns inputs into token ids (chat templates included) for `submit` and
Tokenize, so the event loop never waits on a tokenizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import secrets
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from tokenwire.service.engine.prefixes import PrefixStore, common_prefix
from tokenwire.service.engine.prompts import Prompts
from tokenwire.service.engine.requests import (
    Delta,
    ErrorCode,
    Failure,
    Finished,
    GenerationRequest,
    ModelInfo,
    Output,
    PromptInput,
    RequestError,
    RequestField,
    Started,
    StopReason,
    Timings,
    Tokenized,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tokenwire.service.engine.runner import Runner
from tokenwire.service.engine.scheduler import Phase, ScheduledSequence, Scheduler, SchedulerConfig
from tokenwire.service.engine.sessions import SessionStore
from tokenwire.service.engine.streams import RequestStream
from tokenwire.service.engine.text import TextPiece, TextStream
from tokenwire.service.engine.wording import plural, shown_id
from tokenwire.service.model.types import PrefillChunk, TokenSample

log = logging.getLogger("tokenwire.engine")

T = TypeVar("T")

MAX_REQUEST_ID_CHARS = 128
# Characters a request id may not hold (Unicode categories): control characters (\n, \r, \t, NUL,
# ESC, ...), invisible format characters (bidi overrides, zero-width ones) and line/paragraph
# separators. Ids are echoed in logs, metrics and clients' own output, where such a character could
# end a line, forge the next or hide what the id really is.
UNPRINTABLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# An AFTER_SEGMENT interrupt waits at most this many more tokens for the segment to end: a model
# that never closes its sentence must still stop.
AFTER_SEGMENT_MAX_TOKENS = 64


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    prefill_tokens_per_step: int = 256  # see SchedulerConfig
    prefill_attention_span: int = 0  # see SchedulerConfig
    max_live_requests: int = 256  # waiting + running; beyond this add_request is RESOURCE_EXHAUSTED
    # The most live requests one named principal (owner) may have: no caller takes every slot.
    # 0: no such limit. The anonymous owner ("": no auth) has only max_live_requests.
    max_live_requests_per_owner: int = 0
    output_buffer: int = 16  # deltas queued per request before a slow reader's deltas are merged
    stuck_after_s: float = 30.0  # a step running longer than this makes the engine unhealthy
    session_ttl_s: float = 600.0
    # KV cache kept after requests end, in all: sessions' (pinned) and reused prefixes' (the rest).
    saved_kv_bytes: int = 512 * 1024 * 1024
    # Prompts and prefixes shorter than this are neither kept nor reused: copying so few saves little.
    prefix_min_tokens: int = 32
    # Input refused before it is tokenized (INVALID_ARGUMENT): one tokenizer thread serves every
    # request, so a huge input would hold up all the others for seconds, only to be refused for the
    # context length afterwards. The characters of a prompt, of a Tokenize text, or of a chat's roles
    # and contents in all; and a chat's messages (each costs a pass of the chat template).
    max_prompt_chars: int = 1_000_000
    max_chat_messages: int = 1000


@dataclass
class _Live:
    """The step thread's state for one request."""

    request: GenerationRequest
    seq_id: int
    stream: RequestStream
    text: TextStream
    seed: int
    max_tokens: int
    arrival: float
    deadline: float | None
    cached_prompt_tokens: int = 0
    phase_started: float = 0.0
    first_token_at: float = 0.0
    generated: list[int] = field(default_factory=list)
    last_token: int = -1
    # Tokens pushed to `text` that no delta covers yet (and their logprobs, when asked for): each
    # goes out with the piece its text starts in (see TextStream).
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_text: list[str] = field(default_factory=list)  # kept only for sessions (truncate-to-heard)
    stop_after_segment_at: int | None = None  # token count by which an AFTER_SEGMENT interrupt stops
    has_row: bool = False
    announced: bool = False  # Started was sent
    finished: bool = False


@dataclass(frozen=True)
class _Abort:
    key: tuple[str, str]  # (owner, request id)
    reason: StopReason
    after_segment: bool = False


@dataclass
class _Reservation:
    """A request `submit` is tokenizing: its id and session are taken, it is not live yet. A Cancel
    or Interrupt that comes meanwhile is kept and applied the moment it becomes live."""

    session_key: tuple[str, str]  # (owner, session id); the id is "" without a session
    settled: asyncio.Future[_Live | None]  # the live request, or None when it was refused
    abort: _Abort | None = None


class Engine:
    """Owns the step thread, the scheduler and the registry of live requests."""

    def __init__(self, runner: Runner, config: EngineConfig | None = None) -> None:
        self.runner = runner
        self.config = config or EngineConfig()
        batch = min(self.config.max_batch_size, runner.max_batch_size)
        self.scheduler = Scheduler(
            SchedulerConfig(batch, self.config.prefill_tokens_per_step, self.config.prefill_attention_span)
        )
        self.sessions = SessionStore(self.config.session_ttl_s, self.config.saved_kv_bytes)
        self.prefixes = PrefixStore(
            lambda: self.config.saved_kv_bytes - self.sessions.nbytes, self.config.prefix_min_tokens
        )
        # Sequences held before their prefill (by seq id): (the live sequence computing the prefix they
        # will copy, its length). Step thread only.
        self._borrowing: dict[int, tuple[int, int]] = {}
        self._prompts = Prompts(runner, self.sessions)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Live requests by (owner, request id): each principal names its requests in its own namespace.
        self._live: dict[tuple[str, str], _Live] = {}  # guarded by _lock
        # Requests that `submit` is tokenizing, by (owner, id): taken, not yet live; guarded by _lock
        self._reserved: dict[tuple[str, str], _Reservation] = {}
        self._by_seq: dict[int, _Live] = {}  # step thread only
        self._incoming: queue.SimpleQueue[_Live] = queue.SimpleQueue()
        self._aborts: queue.SimpleQueue[_Abort] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq_ids = itertools.count()
        self._step_started: float | None = None
        self._accepting = True
        # One thread tokenizes and renders chat templates for `submit` and Tokenize, off the event loop.
        # One only: tokenizers are not safe to encode with from two threads at once.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenwire-tokenize")
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, batch size): metrics hook
        self.on_finish: Callable[[GenerationRequest, Finished | Failure], None] | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        """Start the step thread (call from the event loop; warm the runner up before)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenwire-step", daemon=True)
        self._thread.start()
        # The executor starts its thread at the first task: start it with the step thread, so the
        # engine's threads are all there from the start (leak checks compare thread sets).
        self._tokenizer.submit(lambda: None)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let live ones run for up to grace_s, end the rest (SHUTDOWN)."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        results = []
        for (owner, request_id), live in list(self._live.items()):
            self.abort(request_id, StopReason.SHUTDOWN, owner=owner)
            results.append(live.stream.result)
        if results:
            await asyncio.wait(results, timeout=5.0)
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
        # Waiting work is cancelled; a tokenization under way ends first (no thread outlives stop)
        await asyncio.to_thread(self._tokenizer.shutdown, wait=True, cancel_futures=True)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def healthy(self) -> bool:
        """The step thread is alive and no step has run for longer than `stuck_after_s`."""
        if self._thread is None or not self._thread.is_alive():
            return False
        started = self._step_started
        return started is None or time.monotonic() - started < self.config.stuck_after_s

    # ---- introspection (the transport, metrics, tests) ----

    def model_info(self) -> ModelInfo:
        """The model, and the batch and request limits the engine runs it with."""
        runner = self.runner
        return ModelInfo(
            name=runner.name,
            source=runner.source,
            context_length=runner.context_length,
            vocab_size=runner.vocab_size,
            eos_token_ids=tuple(runner.eos_token_ids),
            device=str(runner.device),
            dtype=_type_name(runner.dtype),
            weights=runner.weights,
            activations=runner.activations,
            kv_cache_dtype=_type_name(runner.cache_dtype),
            has_chat_template=runner.has_chat_template,
            max_batch_size=self.scheduler.config.max_batch_size,
            max_live_requests=self.config.max_live_requests,
        )

    def num_live(self) -> int:
        with self._lock:
            return len(self._live)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def kv_slots(self) -> int:
        """KV cache rows in all (the runner's; the engine may be configured to use fewer at once)."""
        return self.runner.max_batch_size

    @property
    def kv_slots_in_use(self) -> int:
        """KV cache rows held by requests."""
        return self.runner.max_batch_size - self.runner.free_rows

    @property
    def session_cache_bytes(self) -> int:
        """Bytes of KV cache kept for sessions."""
        return self.sessions.nbytes

    @property
    def prefix_cache_bytes(self) -> int:
        """Bytes of KV cache kept for automatic prefix reuse."""
        return self.prefixes.nbytes

    @property
    def prefix_cache_hits(self) -> int:
        """Requests that reused a kept prefix (not a session's)."""
        return self.prefixes.hits

    def is_idle(self) -> bool:
        """Nothing live or being submitted and every KV row free (checked, for leak tests)."""
        with self._lock:
            reserved = len(self._reserved)
        return (
            reserved == 0
            and self.num_live() == 0
            and len(self.scheduler) == 0
            and self.runner.live_sequences == 0
            and self.runner.free_rows == self.runner.max_batch_size
        )

    # ---- requests ----

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Register a request and queue it, tokenizing its input on the calling thread. Raises
        RequestError. For callers with nothing else to serve meanwhile (tests, scripts), and not beside
        `submit` (one thread tokenizes at a time); a server calls `submit`, which keeps the event loop
        free while the input is tokenized."""
        self._check_open()
        self._name(request)
        self._check_size(request.input)
        request.prompt_token_ids, max_tokens = self._prompts.prepare(request)
        live = self._live_for(request, max_tokens)
        with self._lock:
            refusal = self._refusal(request)
            if refusal is not None:
                raise refusal
            self._register(live)
        self._wake.set()
        return live.stream

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Register a request and queue it; call on the event loop. Raises RequestError.

        The input is tokenized (and a chat template rendered) on the tokenizer thread while the loop
        serves everything else. The request id, and its session, are reserved before that, so a second
        request cannot take them meanwhile. Refusals are add_request's, in the same order: an input the
        model cannot take is reported before a taken id, a full server or a busy session."""
        self._check_open()
        self._name(request)
        self._check_size(request.input)
        key = request.key
        reservation = _Reservation(request.session_key, asyncio.get_running_loop().create_future())
        with self._lock:
            refusal = self._refusal(request)
            if refusal is None:
                self._reserved[key] = reservation
        try:
            request.prompt_token_ids, max_tokens = await self._off_loop(self._prompts.prepare, request)
            if refusal is not None:
                raise refusal
            live = self._live_for(request, max_tokens)
            with self._lock:
                del self._reserved[key]
                if not self._accepting:  # stop() began while the input was being tokenized
                    raise RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down")
                self._register(live)
                if reservation.abort is not None:  # a Cancel or Interrupt came while it was tokenized
                    self._aborts.put(reservation.abort)
        except BaseException:  # refused, or the caller went away (cancelled) while it waited
            if refusal is None:
                with self._lock:
                    self._reserved.pop(key, None)
                reservation.settled.set_result(None)
            raise
        self._wake.set()
        reservation.settled.set_result(live)
        return live.stream

    def _check_open(self) -> None:
        if not self._accepting:
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down")
        if not self.healthy():
            raise RequestError(ErrorCode.UNAVAILABLE, "the engine is not running")

    @staticmethod
    def _name(request: GenerationRequest) -> None:
        """Give the request an id when it has none; check the one it has."""
        request.request_id = request.request_id or uuid.uuid4().hex
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters",
                RequestField.REQUEST_ID,
            )
        check_printable_id(request.request_id)

    def _check_size(self, given: PromptInput) -> None:
        """Refuse an input beyond the configured limits, before it reaches the tokenizer thread."""
        limit = self.config.max_prompt_chars
        if given.text is not None and len(given.text) > limit:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"{len(given.text):,} characters; the server takes at most {limit:,}",
                RequestField.PROMPT,
            )
        if given.chat is not None:
            if len(given.chat) > self.config.max_chat_messages:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{len(given.chat):,} messages; the server takes at most "
                    f"{self.config.max_chat_messages:,}",
                    RequestField.CHAT_MESSAGES,
                )
            chars = sum(len(role) + len(content) for role, content in given.chat)
            if chars > limit:
                raise RequestError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{chars:,} characters of roles and contents in all; the server takes at most {limit:,}",
                    RequestField.CHAT_MESSAGES,
                )

    def _refusal(self, request: GenerationRequest) -> RequestError | None:
        """Why the registry cannot take this request now, if it cannot. Call with _lock held. Every
        check looks only at the request's owner's own requests and sessions, but the server-wide limit."""
        if request.key in self._live or request.key in self._reserved:
            return RequestError(
                ErrorCode.ALREADY_EXISTS,
                f"request_id {shown_id(request.request_id)} is already live",
                RequestField.REQUEST_ID,
            )
        if len(self._live) + len(self._reserved) >= self.config.max_live_requests:
            return RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the server is at its limit of {plural(self.config.max_live_requests, 'live request')}",
            )
        owner, share = request.owner, self.config.max_live_requests_per_owner
        if owner and share and self._owned(owner) >= share:
            return RequestError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"you have {plural(share, 'live request')}, the most one caller may have at once",
            )
        session_key = request.session_key
        if request.session_id and (
            any(reserved.session_key == session_key for reserved in self._reserved.values())
            or any(other.request.session_key == session_key for other in self._live.values())
        ):
            return RequestError(
                ErrorCode.FAILED_PRECONDITION,
                f"session {shown_id(request.session_id)} already has a live request",
                RequestField.SESSION_ID,
            )
        return None

    def _owned(self, owner: str) -> int:
        """The owner's live and reserved requests. Call with _lock held."""
        return sum(key[0] == owner for key in self._live) + sum(key[0] == owner for key in self._reserved)

    def _live_for(self, request: GenerationRequest, max_tokens: int) -> _Live:
        now = time.monotonic()
        limit = request.stopping.time_limit_s
        return _Live(
            request=request,
            seq_id=next(self._seq_ids),
            stream=RequestStream(request.request_id, self.config.output_buffer),
            text=TextStream(
                self.runner.backend_tokenizer,
                stop=request.stopping.stop,
                chunking=request.output.chunking,
                min_segment_chars=request.output.min_segment_chars,
                fast_first_segment=request.output.fast_first_segment,
                prompt_token_ids=request.prompt_token_ids[-8:],
            ),
            seed=request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63),
            max_tokens=max_tokens,
            arrival=now,
            deadline=now + limit if limit else None,
        )

    def _register(self, live: _Live) -> None:
        """Make the request live and queue it for the step thread. Call with _lock held: `abort`
        finds it live under the same lock, so an abort is always queued after its request."""
        self._live[live.request.key] = live
        self._incoming.put(live)

    async def _off_loop(self, work: Callable[..., T], *args: object) -> T:
        """Run tokenizer work on the tokenizer thread and wait for it without blocking the loop."""
        try:
            pending = asyncio.get_running_loop().run_in_executor(self._tokenizer, work, *args)
        except RuntimeError:  # stop() has shut the thread down
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down") from None
        try:
            return await pending
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # Python 3.11+
            if cancelling is None or cancelling():
                raise  # our caller went away
            # stop() dropped the work before it ran: a refusal the client can act on, not a silent end
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is shutting down") from None

    # ---- tokenizing (on the tokenizer thread) ----

    async def tokenize_text(self, text: str) -> Tokenized:
        """A text's tokens as the model's tokenizer gives them (on the tokenizer thread). Raises
        RequestError for a text beyond max_prompt_chars."""
        self._check_size(PromptInput(text=text))
        return await self._off_loop(self._prompts.tokenize_text, text)

    async def tokenize_chat(self, messages: Sequence[tuple[str, str]]) -> Tokenized:
        """A chat's tokens after the model's chat template (on the tokenizer thread). Raises RequestError."""
        self._check_size(PromptInput(chat=tuple(messages)))
        return await self._off_loop(self._prompts.tokenize_chat, messages)

    # ---- stopping requests ----

    def abort(
        self, request_id: str, reason: StopReason, *, owner: str = "", after_segment: bool = False
    ) -> bool:
        """Stop the owner's live request at the next step, or one `submit` is tokenizing as soon as it
        is live. Idempotent, safe from any thread. Returns whether the request was found."""
        key = (owner, request_id)
        with self._lock:
            found = key in self._live
            reservation = None if found else self._reserved.get(key)
            if reservation is not None and reservation.abort is None:
                reservation.abort = _Abort(key, reason, after_segment)  # `submit` applies it
        if found:
            self._aborts.put(_Abort(key, reason, after_segment))
            self._wake.set()
        return found or reservation is not None

    async def cancel(self, request_id: str, owner: str | None = "") -> Finished | None:
        """Stop the owner's live request and return what it had produced (None when it was not live).
        With owner None (an operator's Cancel), the request of that id of every owner stops; the
        summary is the first one's."""
        with self._lock:
            keys = (
                [(owner, request_id)]
                if owner is not None
                else sorted({k for k in [*self._live, *self._reserved] if k[1] == request_id})
            )
        summaries = [await self._cancel(key) for key in keys]
        return next((summary for summary in summaries if summary is not None), None)

    async def _cancel(self, key: tuple[str, str]) -> Finished | None:
        with self._lock:
            live = self._live.get(key)
            reservation = self._reserved.get(key)
        if not self.abort(key[1], StopReason.CANCELLED, owner=key[0]):
            return None
        if live is None and reservation is None:  # it became live between the two looks
            with self._lock:
                live = self._live.get(key)
        if live is None and reservation is not None:  # still being tokenized: wait until it is live
            live = await asyncio.shield(reservation.settled)
        if live is None:  # refused after all: it never ran
            return None
        result = await asyncio.shield(live.stream.result)
        if isinstance(result, Failure):  # it was found; it ended by failing before it could stop
            return Finished(reason=StopReason.ERROR)
        return result

    def stream_of(self, request_id: str, owner: str = "") -> RequestStream | None:
        with self._lock:
            live = self._live.get((owner, request_id))
        return live.stream if live else None

    # ---- the step thread ----

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.scheduler.has_work() and self._incoming.empty() and self._aborts.empty():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            started = self._step_started = time.monotonic()
            outputs: list[tuple[RequestStream, Output]] = []
            try:
                self.step(outputs)
            except Exception:
                log.exception("engine step failed; ending every live request")
                self._fail_all(outputs)
            finally:
                self._step_started = None
                if outputs:
                    self._deliver(outputs)
            self._call_hook(self.on_step, time.monotonic() - started, self.scheduler.num_decoding)

    @staticmethod
    def _call_hook(hook: Callable[..., None] | None, *args: object) -> None:
        """Observers (metrics, logs) must never take the step loop down."""
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:
            log.exception("engine hook %r failed", hook)

    def step(self, outputs: list[tuple[RequestStream, Output]]) -> None:
        """One engine step. Outputs for the event loop are appended to `outputs`."""
        now = time.monotonic()
        self._take_incoming(now)
        self._apply_aborts(now, outputs)
        self._apply_deadlines(now, outputs)
        for seq_id in self.scheduler.admit():
            self._admit(self._by_seq[seq_id], outputs)
        plan = self.scheduler.plan()
        if plan.prefill:
            chunks = []
            for piece in plan.prefill:
                live = self._by_seq[piece.seq_id]
                ids = live.request.prompt_token_ids[piece.start : piece.end]
                chunks.append(PrefillChunk(piece.seq_id, ids, piece.last))
            samples = self.runner.prefill(chunks)
            self.scheduler.complete_prefill(plan)
            now = time.monotonic()
            for seq_id, token in samples.items():
                self._on_token(self._by_seq[seq_id], token, now, outputs)
        else:
            self.scheduler.complete_prefill(plan)
        if self._borrowing:
            self._settle_borrowing(outputs)
        decoding = [self._by_seq[s] for s in plan.decode if s in self._by_seq]
        decoding = [live for live in decoding if not live.finished and live.generated]
        if decoding:
            samples = self.runner.decode({live.seq_id: live.last_token for live in decoding})
            now = time.monotonic()
            for live in decoding:
                self._on_token(live, samples[live.seq_id], now, outputs)

    def _take_incoming(self, now: float) -> None:
        while True:
            try:
                live = self._incoming.get_nowait()
            except queue.Empty:
                return
            self._by_seq[live.seq_id] = live
            request = live.request
            self.sessions.truncate(request, self.runner)  # it runs: the cut its prompt was built on holds
            self.scheduler.add(ScheduledSequence(live.seq_id, len(request.prompt_token_ids), request.owner))

    def _admit(self, live: _Live, outputs: list[tuple[RequestStream, Output]]) -> None:
        request = live.request
        self.runner.add_sequence(
            live.seq_id,
            request.sampling,
            live.seed,
            prompt_token_ids=request.prompt_token_ids,
            logprobs=request.output.logprobs or request.output.top_logprobs > 0,
            top_n=request.output.top_logprobs,
        )
        live.has_row = True
        live.phase_started = time.monotonic()
        reused = self.sessions.restore(request, self.runner, live.seq_id) if request.session_id else 0
        if not reused:
            reused = self.prefixes.restore(request.owner, request.prompt_token_ids, self.runner, live.seq_id)
        if reused:
            live.cached_prompt_tokens = reused
            self.scheduler.restart_prefill_at(live.seq_id, reused)
        self._update_bans(live)
        if not self._borrow(live):
            self._announce(live, outputs)

    # ---- prefixes of live requests ----

    def _borrow(self, live: _Live) -> bool:
        """Copy a longer prompt prefix from a live request of the same owner, now if it is computed,
        or later: then the sequence is held (no prefill, no Started) until it is. So 16 requests
        that arrive together with one long system prompt prefill it once. Returns whether held."""
        prompt = live.request.prompt_token_ids
        best, donor = max(live.cached_prompt_tokens, self.config.prefix_min_tokens - 1), None
        for other in self._by_seq.values():
            if (
                other is live
                or other.finished
                or not other.has_row
                or other.request.owner != live.request.owner
            ):
                continue
            shared = common_prefix(other.request.prompt_token_ids, prompt[:-1])
            if shared > best:
                best, donor = shared, other
        if donor is None:
            return False
        if self._computed(donor) >= best:
            self._copy_prefix(donor, live, best)
            return False
        self._borrowing[live.seq_id] = (donor.seq_id, best)
        self.scheduler.hold(live.seq_id)
        return True

    def _computed(self, live: _Live) -> int:
        """Prompt tokens whose KV is in the sequence's row."""
        scheduled = self.scheduler.get(live.seq_id)
        return scheduled.prefilled if scheduled is not None else 0

    def _copy_prefix(self, donor: _Live, live: _Live, length: int) -> None:
        self.runner.load_prefix(live.seq_id, self.runner.save_prefix(donor.seq_id, length), length)
        self.prefixes.hits += 1
        live.cached_prompt_tokens = length
        self.scheduler.restart_prefill_at(live.seq_id, length)

    def _settle_borrowing(self, outputs: list[tuple[RequestStream, Output]]) -> None:
        """Release held sequences whose donor has computed their prefix (copying it), or is gone."""
        for seq_id, (donor_id, length) in list(self._borrowing.items()):
            live, donor = self._by_seq.get(seq_id), self._by_seq.get(donor_id)
            if live is None or live.finished:
                del self._borrowing[seq_id]
                continue
            if donor is not None and not donor.finished and self._computed(donor) < length:
                continue  # still computing it
            if donor is not None and not donor.finished:
                self._copy_prefix(donor, live, length)
            else:  # it ended first: what it computed may have been kept
                request = live.request
                reused = self.prefixes.restore(
                    request.owner,
                    request.prompt_token_ids,
                    self.runner,
                    seq_id,
                    beyond=live.cached_prompt_tokens,
                )
                if reused:
                    live.cached_prompt_tokens = reused
                    self.scheduler.restart_prefill_at(seq_id, reused)
            del self._borrowing[seq_id]
            self.scheduler.release(seq_id)
            self._announce(live, outputs)

    def _announce(self, live: _Live, outputs: list[tuple[RequestStream, Output]]) -> None:
        live.announced = True
        outputs.append(
            (
                live.stream,
                Started(
                    prompt_tokens=len(live.request.prompt_token_ids),
                    cached_prompt_tokens=live.cached_prompt_tokens,
                    seed=live.seed,
                    max_tokens=live.max_tokens,
                    queue_s=_to_us(time.monotonic() - live.arrival),
                ),
            )
        )

    def _update_bans(self, live: _Live) -> None:
        """Below min_tokens, EOS and stop token ids may not be sampled."""
        stopping = live.request.stopping
        if stopping.min_tokens and len(live.generated) < stopping.min_tokens:
            banned = set(stopping.stop_token_ids)
            if not stopping.ignore_eos:
                banned.update(self.runner.eos_token_ids)
            self.runner.ban_tokens(live.seq_id, sorted(banned))
        elif stopping.min_tokens and len(live.generated) == stopping.min_tokens:
            self.runner.ban_tokens(live.seq_id, [])

    def _on_token(
        self, live: _Live, sample: TokenSample, now: float, outputs: list[tuple[RequestStream, Output]]
    ) -> None:
        if live.finished:
            return
        token = sample.token_id
        if not live.generated:
            live.first_token_at = now
        live.generated.append(token)
        live.last_token = token
        request = live.request
        if request.stopping.min_tokens:
            self._update_bans(live)

        stopping = request.stopping
        # A stop token or EOS has no text: no chunk covers it (the Finished message reports it).
        if token in stopping.stop_token_ids:
            self._finish(live, StopReason.STOP_SEQUENCE, outputs, stop_sequence=str(token))
            return
        if not stopping.ignore_eos and token in self.runner.eos_token_ids:
            self._finish(live, StopReason.EOS, outputs)
            return
        live.pending_tokens.append(token)
        if request.output.logprobs or request.output.top_logprobs:
            live.pending_logprobs.append(self._logprob(sample))
        update = live.text.push(token)
        for piece in update.pieces:
            self._emit(live, piece, outputs)
            if live.stop_after_segment_at is not None and piece.segment_end:
                self._finish(live, StopReason.INTERRUPTED, outputs, flush=False)
                return
        if update.stop_sequence is not None:
            self._finish(live, StopReason.STOP_SEQUENCE, outputs, stop_sequence=update.stop_sequence)
        elif live.stop_after_segment_at is not None and len(live.generated) >= live.stop_after_segment_at:
            self._finish(live, StopReason.INTERRUPTED, outputs, flush=False)
        elif len(live.generated) >= live.max_tokens:
            reason = StopReason.MAX_TOKENS if stopping.max_tokens is not None else StopReason.CONTEXT_LENGTH
            self._finish(live, reason, outputs)

    def _logprob(self, sample: TokenSample) -> TokenLogprob:
        texts = self.runner.token_texts([sample.token_id, *(t for t, _ in sample.top)])
        top = tuple(TopLogprob(t, text, lp) for (t, lp), text in zip(sample.top, texts[1:], strict=True))
        return TokenLogprob(sample.token_id, texts[0], sample.logprob or 0.0, top)

    def _emit(self, live: _Live, piece: TextPiece, outputs: list[tuple[RequestStream, Output]]) -> None:
        """Send a piece of text with the tokens it covers: the next `piece.tokens` pending ones."""
        if not piece.text and not piece.segment_end:
            return
        n = piece.tokens
        delta = Delta(
            text=piece.text,
            token_ids=live.pending_tokens[:n],
            index=live.sent_tokens,
            logprobs=live.pending_logprobs[:n],
            segment_end=piece.segment_end,
            time=time.time(),
        )
        del live.pending_tokens[:n], live.pending_logprobs[:n]
        live.sent_tokens += n
        live.sent_chars += len(piece.text)
        if live.request.session_id:
            live.sent_text.append(piece.text)
        outputs.append((live.stream, delta))

    def _finish(
        self,
        live: _Live,
        reason: StopReason,
        outputs: list[tuple[RequestStream, Output]],
        *,
        stop_sequence: str = "",
        flush: bool | None = None,
    ) -> None:
        """The one way a request ends: release its row, flush or report held text, send Finished."""
        if live.finished:
            return
        live.finished = True
        natural = reason in (
            StopReason.MAX_TOKENS,
            StopReason.EOS,
            StopReason.CONTEXT_LENGTH,
            StopReason.STOP_SEQUENCE,
        )
        tail = ""
        if flush if flush is not None else natural:
            whole = reason in (StopReason.EOS, StopReason.STOP_SEQUENCE)
            for piece in live.text.finish(complete=whole):
                self._emit(live, piece, outputs)
        else:
            tail = live.text.held_text()
        self._release(live, keep_session=reason is not StopReason.ERROR)
        now = time.monotonic()
        first = live.first_token_at
        decode_s = now - first if first else 0.0
        finished = Finished(
            reason=reason,
            stop_sequence=stop_sequence,
            usage=Usage(
                prompt_tokens=len(live.request.prompt_token_ids),
                completion_tokens=len(live.generated),
                cached_prompt_tokens=live.cached_prompt_tokens,
            ),
            timings=Timings(
                queue_s=_to_us((live.phase_started or now) - live.arrival),
                time_to_first_token_s=_to_us(first - live.arrival) if first else 0.0,
                total_s=_to_us(now - live.arrival),
                decode_tokens_per_second=round((len(live.generated) - 1) / decode_s, 3)
                if decode_s > 0
                else 0.0,
            ),
            sent_text_chars=live.sent_chars,
            sent_tokens=live.sent_tokens,
            tail_text=tail,
        )
        if not live.announced:  # stopped while still waiting: the contract puts Started before Finished
            self._announce(live, outputs)
        outputs.append((live.stream, finished))
        self._call_hook(self.on_finish, live.request, finished)

    def _release(self, live: _Live, *, keep_session: bool) -> None:
        """Free everything the request holds: scheduler entry, KV row, registry entry."""
        phase = self.scheduler.remove(live.seq_id)
        if live.has_row:
            request = live.request
            if keep_session and phase is Phase.DECODE:
                if request.session_id:
                    self.sessions.save(request, live.generated, live.sent_text, self.runner, live.seq_id)
                    self.prefixes.evict()  # sessions come first in the budget
                else:  # the last generated token was never fed back: its KV does not exist
                    tokens = request.prompt_token_ids + live.generated[:-1]
                    self.prefixes.save(request.owner, tokens, self.runner, live.seq_id)
            self.runner.remove_sequence(live.seq_id)
            live.has_row = False
        self._by_seq.pop(live.seq_id, None)
        with self._lock:
            if self._live.get(live.request.key) is live:
                del self._live[live.request.key]

    def _apply_aborts(self, now: float, outputs: list[tuple[RequestStream, Output]]) -> None:
        while True:
            try:
                abort = self._aborts.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                live = self._live.get(abort.key)
            if live is not None and not live.finished and live.seq_id not in self._by_seq:
                self._take_incoming(now)  # queued since this step took its incoming requests
            if live is None or live.finished or live.seq_id not in self._by_seq:
                continue
            if abort.after_segment and live.text.in_segment:
                live.stop_after_segment_at = len(live.generated) + AFTER_SEGMENT_MAX_TOKENS
            else:
                self._finish(live, abort.reason, outputs)

    def _apply_deadlines(self, now: float, outputs: list[tuple[RequestStream, Output]]) -> None:
        for live in list(self._by_seq.values()):
            if live.deadline is not None and now >= live.deadline:
                self._finish(live, StopReason.DEADLINE, outputs)

    def _fail_all(self, outputs: list[tuple[RequestStream, Output]]) -> None:
        for live in list(self._by_seq.values()):
            try:
                self._finish(live, StopReason.ERROR, outputs, flush=False)
            except Exception:
                log.exception("could not end request %s cleanly", shown_id(live.request.request_id))
                with self._lock:
                    self._live.pop(live.request.key, None)
                self._by_seq.pop(live.seq_id, None)
                self.scheduler.remove(live.seq_id)
                outputs.append((live.stream, Finished(reason=StopReason.ERROR)))

    def _deliver(self, outputs: list[tuple[RequestStream, Output]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(_push_all, outputs)


def check_printable_id(request_id: str) -> None:
    """Refuse a request id holding a character of UNPRINTABLE_CATEGORIES (INVALID_ARGUMENT, naming
    RequestField.REQUEST_ID): for a Start here, and for the Cancel or Interrupt that names one, so
    such an id is refused alike wherever it comes. The message gives the character's code point,
    never the character itself."""
    for position, char in enumerate(request_id):
        if unicodedata.category(char) in UNPRINTABLE_CATEGORIES:
            raise RequestError(
                ErrorCode.INVALID_ARGUMENT,
                f"request_id must hold printable characters only: character {position} is U+{ord(char):04X}",
                RequestField.REQUEST_ID,
            )


def _push_all(outputs: list[tuple[RequestStream, Output]]) -> None:
    for stream, item in outputs:
        stream.push(item)


def _to_us(seconds: float) -> float:
    """A duration rounded to the microsecond: finer digits are clock noise, and printed (JSON, logs)
    they read 0.001656 rather than 0.001656249999996362."""
    return round(seconds, 6)


def _type_name(value: object) -> str:
    """A dtype or device as text, without the library's prefix ("bfloat16", not "torch.bfloat16")."""
    return str(value).removeprefix("torch.")

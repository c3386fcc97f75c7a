"""A model runner without torch: scripted tokens, real row bookkeeping, for engine and scheduler tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tokenwire.service.model.types import PrefillChunk, PrefixCache, SamplingParams, TokenSample

WORDS = ["Ġhello", "Ġworld", "Ġthe", "Ġcat", "Ġsat", ".", "Ġon", "Ġmat", ",", "ĠDr", "ĠSmith"]
# Only produced when scripted. "µ" is byte 0xB5 in byte-level BPE: a UTF-8 continuation byte that
# never completes a character.
SCRIPT_ONLY = ["µ"]
SPECIAL = ["<unk>", "<eos>", "<bos>"]
EOS = 1


def make_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + SCRIPT_ONLY)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)
    return tokenizer


def token_id(word: str) -> int:
    return (SPECIAL + WORDS + SCRIPT_ONLY).index(word)


@dataclass
class _Seq:
    row: int
    sampling: SamplingParams
    history: list[int] = field(default_factory=list)
    banned: list[int] = field(default_factory=list)
    decoding: bool = False
    emitted: int = 0


class FakeRunner:
    """Next token = a deterministic function of the sequence's history, or a script per first prompt token.

    `script[first_prompt_token]` gives the tokens to produce in order (then EOS). `step_delay` makes
    each forward take time, `fail` raises from the next forward, and `calls` records what ran."""

    name = "fake"
    source = "tests/fake_runner.py"
    device = "cpu"
    dtype = "none"
    weights = "dense"
    activations = ""
    cache_dtype = "none"
    has_chat_template = True
    bos_token_id = 2

    def __init__(self, max_batch_size: int = 4, context_length: int = 64, step_delay: float = 0.0) -> None:
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.step_delay = step_delay
        self.vocab_size = len(SPECIAL) + len(WORDS) + len(SCRIPT_ONLY)
        self.eos_token_ids = (EOS,)
        self.tokenizer = make_tokenizer()
        self.script: dict[int, list[int]] = {}
        self.fail: Exception | None = None
        self.calls: list[tuple[str, object]] = []
        self.on_forward: Callable[[], None] | None = None
        self._seqs: dict[int, _Seq] = {}
        self._free = set(range(max_batch_size))
        self.lock = threading.Lock()

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def live_sequences(self) -> int:
        return len(self._seqs)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if any(role not in ("system", "user", "assistant") for role, _ in messages):
            raise ValueError("unknown role")
        return [self.bos_token_id] + [t for _, content in messages for t in self.encode(content)]

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in token_ids]

    def add_sequence(
        self,
        seq_id: int,
        sampling: SamplingParams,
        seed: int,
        *,
        prompt_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_n: int = 0,
    ) -> None:
        row = min(self._free)  # raises when full: the scheduler must admit by rows
        self._free.remove(row)
        self._seqs[seq_id] = _Seq(row, sampling)

    def remove_sequence(self, seq_id: int) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._free.add(seq.row)

    def ban_tokens(self, seq_id: int, token_ids: Sequence[int]) -> None:
        self._seqs[seq_id].banned = list(token_ids)

    def _forward(self, kind: str, detail: object) -> None:
        self.calls.append((kind, detail))
        if self.on_forward is not None:
            self.on_forward()
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail is not None:
            error, self.fail = self.fail, None
            raise error

    def _next(self, seq: _Seq) -> TokenSample:
        scripted = self.script.get(seq.history[0]) if seq.history else None
        if scripted is not None:
            token = scripted[seq.emitted] if seq.emitted < len(scripted) else EOS
        else:
            token = len(SPECIAL) + (sum(seq.history) + seq.emitted) % len(WORDS)
        if token in seq.banned:
            token = len(SPECIAL)
        seq.emitted += 1
        return TokenSample(token, -0.5, [(token, -0.5)])

    def prefill(self, chunks: Sequence[PrefillChunk]) -> dict[int, TokenSample]:
        self._forward("prefill", [(c.seq_id, len(c.token_ids)) for c in chunks])
        out = {}
        for c in chunks:
            seq = self._seqs[c.seq_id]
            seq.history.extend(c.token_ids)
            if c.last:
                seq.decoding = True
                out[c.seq_id] = self._next(seq)
        return out

    def decode(self, token_ids: dict[int, int]) -> dict[int, TokenSample]:
        decoding = {i for i, s in self._seqs.items() if s.decoding}
        assert set(token_ids) == decoding, "decode must cover every decoding sequence"
        self._forward("decode", sorted(token_ids))
        return {i: self._next(self._seqs[i]) for i in token_ids}

    def save_prefix(self, seq_id: int, length: int) -> PrefixCache:
        return PrefixCache(length, payload=list(self._seqs[seq_id].history[:length]), nbytes=length * 8)

    def load_prefix(self, seq_id: int, prefix: PrefixCache, length: int) -> None:
        self._seqs[seq_id].history = list(prefix.payload[:length])

    def warm_up(self) -> None:
        pass


class ForwardGate:
    """Holds the fake model at the start of each forward until the test lets it through.

    Install it as `FakeRunner.on_forward`; a test then acts at a step it chose instead of sleeping
    and hoping the step thread got there. It starts closed (or open, with `open=True`): `allow(n)`
    lets n more forwards through, `open()` every one from then on, `close()` none after those
    already let through. `wait_held(n)` waits until the step thread is held in forward n (counted
    from 1 since the gate was made; any forward when n is None) and returns n. A step runs up to
    two forwards: the prefill chunks, then one decode of every decoding sequence (those whose
    prefill just ended included).

    While the step thread is held, the outputs of every earlier step have been handed to the event
    loop (the engine delivers a step's outputs before it starts the next); a coroutine that awaits
    `held` runs after they were pushed to their streams. A forward held longer than `timeout`
    raises in the step thread (the engine then ends its requests with ERROR), so a test that never
    opens the gate fails instead of hanging."""

    def __init__(self, *, open: bool = False, timeout: float = 30.0) -> None:
        self._changed = threading.Condition()
        self._open = open
        self._allowed = 0
        self._timeout = timeout
        self.arrived = 0  # forwards that reached the gate
        self.passed = 0  # forwards it let through

    def __call__(self) -> None:
        """The step thread, at the start of a forward."""
        with self._changed:
            self.arrived += 1
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: self._open or self._allowed > 0, self._timeout):
                raise TimeoutError(
                    f"forward {self.arrived} held for {self._timeout} s: the test never let it go"
                )
            if not self._open:
                self._allowed -= 1
            self.passed += 1
            self._changed.notify_all()

    def allow(self, forwards: int = 1) -> None:
        with self._changed:
            self._allowed += forwards
            self._changed.notify_all()

    def open(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._open = False
            self._allowed = 0

    def wait_held(self, forward: int | None = None, timeout: float = 10.0) -> int:
        """Block until the step thread is held in `forward` (any, when None); return its number."""

        def held() -> bool:
            return self.arrived == self.passed + 1 and forward in (None, self.arrived)

        with self._changed:
            if not self._changed.wait_for(held, timeout):
                raise AssertionError(
                    f"the step thread was not held in forward {forward or 'any'} within {timeout} s "
                    f"({self.arrived} arrived, {self.passed} let through)"
                )
            return self.arrived

    async def held(self, forward: int | None = None, timeout: float = 10.0) -> int:
        """`wait_held` from the event loop."""
        return await asyncio.to_thread(self.wait_held, forward, timeout)

    async def advance(self, timeout: float = 10.0) -> int:
        """Let the held forward through and wait until the step thread is held in the next one."""
        with self._changed:
            current = self.arrived
        self.allow(1)
        return await self.held(current + 1, timeout)

"""Hostile requests: hypothesis strategies for every request message, and an oracle for Starts.

The oracle is written from the contract in tokenwire.proto, not from the server's code: what must be
refused and with which field, and which stop reasons may end a request that runs.
"""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections.abc import Sequence

from hypothesis import strategies as st

from tests.fake_runner import FakeRunner
from tests.reliability.conftest import FUZZ_CONTEXT, FUZZ_MESSAGE_BYTES
from tests.reliability.contract import EXISTS, INVALID, PRECONDITION, check_error, check_generation, kind
from tokenwire.v1 import tokenwire_pb2 as pb

VOCAB = FakeRunner().vocab_size
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1

# ---- strategies ----
#
# Each Start is "clean" (every field valid), has one hostile field, or is wild (any field hostile), so
# that both the refusals and the generations (and interrupts of live ones) get their share of cases.

# Proto strings are UTF-8, which cannot hold a lone surrogate: everything else is fair game.
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
WORDS = [" hello", " world", " the", " cat", " sat", ".", ",", " Dr", " Smith", " mat"]
VOCAB_TEXT = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map("".join)
ODD_TEXT = st.sampled_from(
    [
        *("", " ", "\x00", "\u202e\u202d", "e\u0301", "🦜", "你好", "\ufeff", "\U0010ffff", "\r\n\t"),
        *("%s%n{}", "\\", "'\"", "<eos>", "<bos>", "<unk>", "\x00" * 5, " " * 300, "é" * 257, " hello" * 70),
    ]
)
TEXT = st.one_of(VOCAB_TEXT, ANY_TEXT, ODD_TEXT)

FLOAT = st.one_of(
    st.floats(width=32),  # NaN and infinities included
    st.sampled_from([0.0, -0.0, 1e-45, 0.5, 1.0, 1.0000001, 10.0, 100.0, 100.00001, -1.0, 3.4e38]),
)
UINT32 = st.one_of(
    st.integers(0, 8), st.integers(0, 80), st.integers(0, UINT32_MAX), st.sampled_from([2**31 - 1, 2**31])
)
UINT64 = st.one_of(st.integers(0, UINT64_MAX), st.sampled_from([0, 2**63 - 1, 2**63, UINT64_MAX]))
GOOD_TOKEN = st.integers(0, VOCAB - 1)
TOKEN_ID = st.one_of(GOOD_TOKEN, st.integers(VOCAB, VOCAB + 3), UINT32)
# Around the message size limit (the Start's wrapper adds a few bytes): prompts and huge repeated fields.
NEAR_LIMIT = st.integers(FUZZ_MESSAGE_BYTES - 40, FUZZ_MESSAGE_BYTES + 40)
HUGE_INPUTS = st.one_of(
    NEAR_LIMIT.map(lambda n: ("prompt", "x" * n)),
    NEAR_LIMIT.map(lambda n: ("prompt", " hello" * (n // 6))),
    NEAR_LIMIT.map(lambda n: ("token_ids", [3] * n)),  # one byte per id, packed
    st.integers(1, 2 * FUZZ_MESSAGE_BYTES).map(lambda n: ("token_ids", [5] * n)),
)


def open_enum(*known: int) -> st.SearchStrategy[int]:
    """proto3 enums are open: any int32 arrives, known or not."""
    return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))


def optional(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.none(), strategy)


def message_of(cls: type, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """A message whose optional fields are each either left out or drawn."""
    return st.fixed_dictionaries({k: optional(v) for k, v in fields.items()}).map(
        lambda d: cls(**{k: v for k, v in d.items() if v is not None})
    )


# Logical ids: a few names so that duplicates and interrupts of live requests happen, plus oddities.
# Each case prefixes them when sent ("" stays empty: the server assigns an id).
POOL = st.sampled_from(["a", "b", "c"])
GOOD_ID = st.one_of(POOL, POOL, POOL, st.just(""), ANY_TEXT)
BAD_ID = st.integers(110, 140).map(lambda n: "x" * n)  # around the 128-character limit, with the prefix
GOOD_CHAT = st.lists(
    st.builds(pb.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]), content=VOCAB_TEXT),
    min_size=1,
    max_size=3,
)
ROLE = st.one_of(st.sampled_from(["system", "user", "assistant", "", "robot"]), ANY_TEXT)
ANY_CHAT = st.lists(st.builds(pb.ChatMessage, role=ROLE, content=TEXT), max_size=4)
GOOD_INPUT = st.one_of(
    st.tuples(st.just("prompt"), VOCAB_TEXT),
    st.tuples(st.just("prompt"), ANY_TEXT.filter(bool)),
    st.tuples(st.just("chat"), GOOD_CHAT),
    st.tuples(st.just("token_ids"), st.lists(GOOD_TOKEN, min_size=1, max_size=16)),
)
BAD_INPUT = st.one_of(
    st.tuples(st.just("none"), st.none()),
    st.tuples(st.just("prompt"), TEXT),
    st.tuples(st.just("chat"), ANY_CHAT),
    st.tuples(st.just("token_ids"), st.lists(TOKEN_ID, max_size=16)),
)
GOOD_SAMPLING = message_of(
    pb.SamplingParams,
    temperature=st.floats(0, 100, width=32),
    top_k=st.integers(0, 50),
    top_p=st.floats(0, 1, exclude_min=True, width=32),
    min_p=st.floats(0, 1, width=32),
    repetition_penalty=st.floats(0, 10, exclude_min=True, width=32),
    seed=UINT64,
)
BAD_SAMPLING = message_of(
    pb.SamplingParams, temperature=FLOAT, top_k=UINT32, top_p=FLOAT, min_p=FLOAT, repetition_penalty=FLOAT
)


@st.composite
def good_stopping(draw: st.DrawFn) -> pb.StoppingParams:
    message = pb.StoppingParams(ignore_eos=draw(st.booleans()))
    max_tokens = draw(optional(st.integers(1, 40)))
    if max_tokens is not None:
        message.max_tokens = max_tokens
    message.min_tokens = draw(st.integers(0, max_tokens if max_tokens is not None else 10))
    message.stop.extend(draw(st.lists(VOCAB_TEXT, max_size=3)))
    message.stop_token_ids.extend(draw(st.lists(GOOD_TOKEN, max_size=3)))
    limit = draw(optional(st.integers(0, 50)))
    if limit is not None:
        message.time_limit_ms = limit
    return message


@st.composite
def bad_stopping(draw: st.DrawFn) -> pb.StoppingParams:
    message = draw(message_of(pb.StoppingParams, max_tokens=UINT32, min_tokens=UINT32, time_limit_ms=UINT32))
    stops = st.one_of(TEXT, st.integers(250, 260).map(lambda n: "y" * n))
    message.stop.extend(
        draw(st.one_of(st.lists(stops, max_size=4), st.lists(stops, min_size=15, max_size=18)))
    )
    ids = st.one_of(st.lists(TOKEN_ID, max_size=4), st.lists(GOOD_TOKEN, min_size=60, max_size=70))
    message.stop_token_ids.extend(draw(ids))
    message.ignore_eos = draw(st.booleans())
    return message


GOOD_OUTPUT = st.builds(
    pb.OutputOptions,
    chunking=st.integers(0, 4),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, 20),
    token_ids=st.booleans(),
    timestamps=st.booleans(),
    min_segment_chars=st.integers(0, 30),
    fast_first_segment=st.booleans(),
)
BAD_OUTPUT = st.builds(
    pb.OutputOptions,
    chunking=open_enum(0, 1, 2, 3, 4),
    logprobs=st.booleans(),
    top_logprobs=st.one_of(st.integers(18, 22), UINT32),
    token_ids=st.booleans(),
    timestamps=st.booleans(),
    min_segment_chars=st.one_of(st.integers(990, 1010), UINT32),
    fast_first_segment=st.booleans(),
)
GOOD_SESSION = st.tuples(
    st.sampled_from(["", "", "s1", "s2"]), st.sampled_from(["none", "chars", "tokens"]), UINT32
)
BAD_SESSION = st.tuples(
    st.sampled_from(["", "s1", "s" * 129]), st.sampled_from(["none", "empty", "chars", "tokens"]), UINT32
)
PARTS = ("id", "input", "sampling", "stopping", "output", "session")


@st.composite
def starts(draw: st.DrawFn, huge: bool = False) -> pb.GenerateRequest:
    mode = draw(st.sampled_from(["clean", "clean", "one", "wild"]))
    hostile = {draw(st.sampled_from(PARTS))} if mode == "one" else set()
    if mode == "wild":
        hostile = {part for part in PARTS if draw(st.booleans())}
    bad_input = BAD_INPUT
    if huge:  # one hostile input in eight: each ends the shared stream, which then has to reopen
        bad_input = st.sampled_from([False] * 7 + [True]).flatmap(
            lambda big: HUGE_INPUTS if big else BAD_INPUT
        )

    def part(name: str, good: st.SearchStrategy, bad: st.SearchStrategy):
        return draw(bad if name in hostile else good)

    message = pb.Start(request_id=part("id", GOOD_ID, BAD_ID))
    which, value = part("input", GOOD_INPUT, bad_input)
    if which == "prompt":
        message.prompt = value
    elif which == "chat":
        message.chat.messages.extend(value)
        message.chat.SetInParent()  # set even when empty: an empty chat is its own case
    elif which == "token_ids":
        message.token_ids.ids.extend(value)
        message.token_ids.SetInParent()
    for name, good, bad in (
        ("sampling", GOOD_SAMPLING, BAD_SAMPLING),
        ("stopping", good_stopping(), bad_stopping()),
        ("output", GOOD_OUTPUT, BAD_OUTPUT),
    ):
        value = draw(optional(bad if name in hostile else good))
        if value is not None:
            getattr(message, name).CopyFrom(value)
    session, truncation, keep = part("session", GOOD_SESSION, BAD_SESSION)
    message.session_id = session
    if truncation == "empty":
        message.truncate_session.SetInParent()
    elif truncation == "chars":
        message.truncate_session.reply_chars = keep
    elif truncation == "tokens":
        message.truncate_session.reply_tokens = keep
    return pb.GenerateRequest(start=message)


INTERRUPTS = st.builds(
    lambda request_id, mode: pb.GenerateRequest(interrupt=pb.Interrupt(request_id=request_id, mode=mode)),
    st.one_of(POOL, POOL, POOL, GOOD_ID, BAD_ID),
    open_enum(0, 1, 2),
)


@st.composite
def cases(draw: st.DrawFn, huge: bool = False) -> list[pb.GenerateRequest]:
    """A case: a few messages sent back to back on the shared stream."""
    # A Heartbeat among them must change nothing: no answer, no effect on the requests around it.
    heartbeat = st.just(pb.GenerateRequest(heartbeat=pb.Heartbeat()))
    one = st.one_of(
        starts(huge), starts(huge), starts(huge), INTERRUPTS, st.just(pb.GenerateRequest()), heartbeat
    )
    messages: list[pb.GenerateRequest] = draw(st.lists(one, min_size=1, max_size=5))
    named = [m.start.request_id for m in messages if m.HasField("start") and m.start.request_id]
    # Random interrupts seldom name a request of their own case: aim one at it, often while it runs.
    aim: bool = draw(st.booleans())
    if named and aim:
        target = pb.Interrupt(request_id=draw(st.sampled_from(named)), mode=draw(st.sampled_from([0, 1, 2])))
        messages.append(pb.GenerateRequest(interrupt=target))
    return messages


# ---- the oracle: what the contract says about one Start ----


@dataclasses.dataclass
class Verdict:
    must: set[str]  # fields of which one must be named by an INVALID_ARGUMENT Error
    may: set[str]  # fields the server may also name (checks that depend on server-side state)
    reasons: set[int]  # stop reasons allowed if it runs


def _bad_float(value: float, low: float, high: float, *, low_open: bool) -> bool:
    return not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high)


def printable_id(request_id: str) -> bool:
    """The contract's rule for request ids: no control, format or line/paragraph separator characters."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in request_id)


def judge(message: pb.Start, runner: FakeRunner, interrupted: bool) -> Verdict:
    must: set[str] = set()
    may: set[str] = set()
    if len(message.request_id) > 128 or not printable_id(message.request_id):
        must.add("start.request_id")
    if len(message.session_id) > 128:
        must.add("start.session_id")
    prompt_ids: list[int] | None = None
    which = message.WhichOneof("input")
    if which is None or (which == "prompt" and not message.prompt):
        must.add("start.input")
    elif which == "prompt":
        prompt_ids = runner.encode(message.prompt)
    elif which == "token_ids":
        ids = list(message.token_ids.ids)
        if not ids:
            must.add("start.input")
        elif any(t >= VOCAB for t in ids):
            must.add("start.token_ids.ids")
        else:
            prompt_ids = ids
    else:
        chat = message.chat.messages
        if not chat or any(not m.role for m in chat):
            must.add("start.chat.messages")
        elif any(m.role not in ("system", "user", "assistant") for m in chat):
            must.add("start.chat")  # the fake chat template knows these three roles only
        else:
            prompt_ids = runner.encode_chat([(m.role, m.content) for m in chat])
    s = message.sampling
    path = "start.sampling"
    if s.HasField("temperature") and _bad_float(s.temperature, 0.0, 100.0, low_open=False):
        must.add(f"{path}.temperature")
    if s.HasField("top_p") and _bad_float(s.top_p, 0.0, 1.0, low_open=True):
        must.add(f"{path}.top_p")
    if s.HasField("min_p") and _bad_float(s.min_p, 0.0, 1.0, low_open=False):
        must.add(f"{path}.min_p")
    if s.HasField("repetition_penalty") and _bad_float(s.repetition_penalty, 0.0, 10.0, low_open=True):
        must.add(f"{path}.repetition_penalty")
    p = message.stopping
    path = "start.stopping"
    max_tokens = p.max_tokens if p.HasField("max_tokens") else None
    if max_tokens == 0:
        must.add(f"{path}.max_tokens")
    if max_tokens is not None and p.min_tokens > max_tokens:
        must.add(f"{path}.min_tokens")
    if len(p.stop) > 16 or any(not 1 <= len(stop) <= 256 for stop in p.stop):
        must.add(f"{path}.stop")
    if len(p.stop_token_ids) > 64 or any(t >= VOCAB for t in p.stop_token_ids):
        must.add(f"{path}.stop_token_ids")
    o = message.output
    if o.chunking not in range(5):
        must.add("start.output.chunking")
    if o.top_logprobs > 20:
        must.add("start.output.top_logprobs")
    if o.min_segment_chars > 1000:
        must.add("start.output.min_segment_chars")
    if message.HasField("truncate_session") and message.truncate_session.WhichOneof("keep") is None:
        must.add("start.truncate_session")
    # Against the model: the context and the vocabulary.
    model_fields = set()
    if prompt_ids is not None:
        if not prompt_ids or len(prompt_ids) >= FUZZ_CONTEXT:
            model_fields.add("start.input")
        elif max_tokens is not None and max_tokens > FUZZ_CONTEXT - len(prompt_ids):
            model_fields.add("start.stopping.max_tokens")
    if message.session_id:
        # The session's history comes before this turn's input: the prompt may be longer than it looks.
        may |= model_fields | {"start.input", "start.stopping.max_tokens"}
    else:
        must |= model_fields
    # max_tokens past the room left is refused up front, so a set max_tokens never meets the context's end.
    reasons = {pb.STOP_REASON_MAX_TOKENS if max_tokens is not None else pb.STOP_REASON_CONTEXT_LENGTH}
    if not p.ignore_eos:
        reasons.add(pb.STOP_REASON_EOS)
    if p.stop or p.stop_token_ids:
        reasons.add(pb.STOP_REASON_STOP_SEQUENCE)
    if p.time_limit_ms:
        reasons.add(pb.STOP_REASON_DEADLINE)
    if interrupted:
        reasons.add(pb.STOP_REASON_INTERRUPTED)
    return Verdict(must, may, reasons)


def check_run(run: Sequence[pb.GenerateResponse], message: pb.Start, verdict: Verdict, dup: bool) -> None:
    """One lifecycle of one Start, against its verdict."""
    if kind(run[0]) == "error":
        error = run[0].error
        check_error(error)
        if error.code == INVALID:
            assert error.field in verdict.must | verdict.may, (error.field, verdict, message)
            return
        assert not verdict.must, f"expected INVALID_ARGUMENT on one of {verdict.must}, got {error}"
        assert (error.code == EXISTS and dup) or (error.code == PRECONDITION and message.session_id), error
        return
    assert not verdict.must, f"accepted, but one of {verdict.must} is invalid: {message}"
    finished = check_generation(run, token_ids=message.output.token_ids)
    assert finished.reason in verdict.reasons, (pb.StopReason.Name(finished.reason), verdict.reasons)
    p = message.stopping
    if finished.reason == pb.STOP_REASON_MAX_TOKENS:
        assert finished.usage.completion_tokens == p.max_tokens
    if finished.reason == pb.STOP_REASON_STOP_SEQUENCE:
        by_id = finished.stop_sequence in {str(t) for t in p.stop_token_ids}
        assert by_id or finished.stop_sequence in p.stop, finished
    if p.stop:  # nothing sent may contain a stop string (min_tokens does not delay them)
        text = "".join(r.chunk.text for r in run if kind(r) == "chunk")
        assert not any(stop in text for stop in p.stop), (text, list(p.stop))

"""Truncate-to-heard on its own: the same cut as the original token-by-token loop, at a cost that does
not grow with the square of the reply (a stub runner around real tokenizers; no model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fake_runner import EOS, make_tokenizer, token_id
from tests.text_fixtures import bytelevel_tokenizer, llama_tokenizer
from tokenwire.service.engine.requests import SessionTruncation
from tokenwire.service.engine.sessions import _Session, _truncated

PROMPT = [2, 5, 6]  # raw sessions: the history's earlier tokens, kept as they are


class CountingTokenizer:
    """A tokenizer whose decode calls, and the tokens they decode, are counted."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.tokens = 0

    def decode(self, ids: Sequence[int], **kw: Any) -> str:
        self.calls += 1
        self.tokens += len(ids)
        return str(self.inner.decode(list(ids), **kw))


@dataclass
class StubRunner:
    backend_tokenizer: CountingTokenizer
    eos_token_ids: tuple[int, ...] = (EOS,)
    calls: list[object] = field(default_factory=list)


def _session(reply_ids: list[int], tokenizer: Any, chat: bool) -> _Session:
    if chat:
        reply_text = tokenizer.decode([t for t in reply_ids if t != EOS])
        return _Session(
            chat=[("user", "hi"), ("assistant", reply_text)], history_ids=[], reply_ids=reply_ids, last_used=0
        )
    history = PROMPT + [t for t in reply_ids if t != EOS]
    return _Session(chat=None, history_ids=history, reply_ids=list(reply_ids), last_used=0)


def _reference(session: _Session, truncation: SessionTruncation, tokenizer: Any) -> None:
    """The original implementation (drop the last token until the text fits): quadratic, but the
    behaviour the fast one must keep exactly."""
    reply_ids = [t for t in session.reply_ids if t != EOS]
    if truncation.reply_tokens is not None:
        keep_ids = reply_ids[: truncation.reply_tokens]
        heard = tokenizer.decode(keep_ids)
    else:
        chars = truncation.reply_chars or 0
        full = session.chat[-1][1] if session.chat else tokenizer.decode(reply_ids)
        heard = full[:chars]
        keep_ids = reply_ids
        while keep_ids and len(tokenizer.decode(keep_ids)) > chars:
            keep_ids = keep_ids[:-1]
    session.reply_ids = keep_ids
    if session.chat is not None and session.chat and session.chat[-1][0] == "assistant":
        session.chat[-1] = ("assistant", heard)
    elif session.chat is None:
        cut = len(session.history_ids) - len(reply_ids)
        session.history_ids = session.history_ids[:cut] + keep_ids


def _replies() -> list[tuple[str, Any, list[int]]]:
    """(name, tokenizer, reply ids): word tokens, "▁" pieces with byte fallback, byte-level BPE with
    characters split across tokens, a lone continuation byte (decodes to U+FFFD), EOS at the end."""
    fake = make_tokenizer()
    words = [token_id(w) for w in ("Ġhello", "Ġworld", ",", "ĠDr", ".", "ĠSmith", "Ġsat", "µ", "Ġon")]
    llama = llama_tokenizer()
    byte = bytelevel_tokenizer()
    return [
        ("words", fake, [*words, EOS]),
        ("continuation-byte", fake, [token_id("µ"), token_id("Ġcat"), token_id("µ"), token_id("µ")]),
        ("empty", fake, [EOS]),
        ("llama", llama, llama.encode("Hello world, Dr. Smith said: naïve 中文 😀😀 ok!").ids),
        ("bytelevel", byte, byte.encode("Café, naïve résumé — 3.14? 中文 😀 yes.").ids),
    ]


CASES = [(name, chat) for name, _, _ in _replies() for chat in (False, True)]


@pytest.mark.parametrize(("name", "chat"), CASES)
def test_truncation_matches_the_original_loop_for_every_cut(name: str, chat: bool) -> None:
    _, tokenizer, reply = next(r for r in _replies() if r[0] == name)
    full = tokenizer.decode([t for t in reply if t != EOS])
    cuts = [SessionTruncation(reply_chars=c) for c in range(len(full) + 3)]
    cuts += [SessionTruncation(reply_tokens=n) for n in range(len(reply) + 2)]
    cuts.append(SessionTruncation())  # neither set: no characters heard
    for truncation in cuts:
        expected = _session(list(reply), tokenizer, chat)
        _reference(expected, truncation, tokenizer)
        before = _session(list(reply), tokenizer, chat)
        got = _truncated(before, truncation, StubRunner(CountingTokenizer(tokenizer)))  # type: ignore[arg-type]
        untouched = _session(list(reply), tokenizer, chat)
        assert (before.reply_ids, before.history_ids, before.chat) == (
            untouched.reply_ids,
            untouched.history_ids,
            untouched.chat,
        )  # a new session: the one given stays as it was
        assert (got.reply_ids, got.history_ids, got.chat) == (
            expected.reply_ids,
            expected.history_ids,
            expected.chat,
        ), truncation


def test_truncation_table() -> None:
    """A few cuts written out: the tokens kept are the longest prefix whose text fits what was heard."""
    fake = make_tokenizer()
    hello, world, comma, µ = (token_id(w) for w in ("Ġhello", "Ġworld", ",", "µ"))
    reply = [hello, world, comma, µ, EOS]  # " hello world,\ufffd"
    table = [
        (SessionTruncation(reply_chars=0), []),
        (SessionTruncation(reply_chars=5), []),
        (SessionTruncation(reply_chars=6), [hello]),
        (SessionTruncation(reply_chars=11), [hello]),
        (SessionTruncation(reply_chars=12), [hello, world]),
        (SessionTruncation(reply_chars=13), [hello, world, comma]),
        (SessionTruncation(reply_chars=14), [hello, world, comma, µ]),
        (SessionTruncation(reply_chars=100), [hello, world, comma, µ]),
        (SessionTruncation(reply_tokens=2), [hello, world]),
    ]
    for truncation, kept in table:
        session = _truncated(
            _session(list(reply), fake, chat=False), truncation, StubRunner(CountingTokenizer(fake))
        )  # type: ignore[arg-type]
        assert session.reply_ids == kept, truncation
        assert session.history_ids == PROMPT + kept


@pytest.mark.parametrize("chars", [0, 7, "half"])
def test_truncation_cost_grows_linearly_with_the_reply(chars: int | str) -> None:
    """Decoded tokens per reply token stay flat as the reply grows 8x (the old loop decoded every
    prefix from the longest down: 32M tokens for an 8,000-token reply cut to nothing)."""
    fake = make_tokenizer()
    words = [token_id(w) for w in ("Ġhello", "Ġworld", ",", "Ġthe", "Ġcat", ".")]
    per_token = []
    for n in (1000, 8000):
        reply = [words[i % len(words)] for i in range(n)]
        counting = CountingTokenizer(fake)
        heard = n * 3 if chars == "half" else int(chars)
        _truncated(
            _session(reply, fake, chat=False), SessionTruncation(reply_chars=heard), StubRunner(counting)
        )  # type: ignore[arg-type]
        # A binary search over prefix lengths: about log2(n) decodes, none longer than the reply,
        assert counting.calls <= math.log2(n) + 20  # and up to 16 just past where it ends
        per_token.append(counting.tokens / n)
    # n log n at most: 8x the tokens costs at most ~1.3x more per token (quadratic would be 8x).
    assert per_token[1] <= per_token[0] * 1.5

"""Conversation sessions: history kept server-side and the KV cache of its tokens, reused next turn.

A session remembers its conversation (chat messages, or raw token ids) and the KV cache of the
tokens it last computed. A new turn's prompt is the history plus the turn's new input; the longest
common token prefix with the cached tokens is copied into the new row instead of being prefilled.
Truncation cuts the last reply to what the user heard, so the unheard text leaves the context.

Sessions are keyed by their owner (the principal) and id: one session never reads another's cache,
and one principal never reaches another's session by naming its id. They expire after an idle TTL,
and are evicted least recently used first beyond a byte budget. Plain Python: the KV payload is
opaque (the runner's own).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenwire.service.engine.requests import (
    ErrorCode,
    GenerationRequest,
    RequestError,
    RequestField,
    SessionTruncation,
)
from tokenwire.service.engine.runner import Runner
from tokenwire.service.engine.wording import shown_id
from tokenwire.service.model.types import PrefixCache


@dataclass
class _Session:
    chat: list[tuple[str, str]] | None  # history as messages (chat turns), or None for raw token turns
    history_ids: list[int]  # raw turns: the token history
    reply_ids: list[int]  # the last reply's tokens (as generated)
    last_used: float  # by the store's clock
    cached_ids: list[int] = field(default_factory=list)  # tokens whose KV `kv` holds, in order
    kv: PrefixCache | None = None


class SessionStore:
    def __init__(self, ttl_s: float, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        # Seconds, for the idle TTL; only differences count. Tests swap in a clock they move by hand.
        self.clock = clock
        self._sessions: OrderedDict[tuple[str, str], _Session] = OrderedDict()  # by (owner, session id)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self.clock())
            return len(self._sessions)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.kv.nbytes for s in self._sessions.values() if s.kv is not None)

    # ---- building a turn's prompt (the engine's tokenizer thread; the lock guards the store) ----

    def prompt_ids(self, request: GenerationRequest, runner: Runner) -> list[int]:
        """Tokenize the request's input, after the session's history when it has one (cut as the
        request's truncation asks). The session itself is not changed: a request refused after this
        (its id taken, the session busy) must leave it as it was; see `truncate`."""
        given = request.input
        with self._lock:
            self._expire(self.clock())
            session = self._sessions.get(request.session_key) if request.session_id else None
            if session is None and request.continue_session:
                raise RequestError(
                    ErrorCode.NOT_FOUND,
                    f"session {shown_id(request.session_id)} has no history here (expired, evicted, or "
                    "kept by another replica): send the whole conversation",
                    RequestField.SESSION_ID,
                )
            if session is not None and request.truncation is not None:
                session = _truncated(session, request.truncation, runner)
            history_chat = list(session.chat) if session and session.chat is not None else None
            history_ids = list(session.history_ids) if session and session.chat is None else []
        if given.chat is not None:
            return runner.encode_chat([*(history_chat or []), *given.chat])
        if given.text is not None:
            ids = runner.encode(given.text) if not history_ids else _encode_plain(runner, given.text)
            return history_ids + ids
        return history_ids + list(given.token_ids or ())

    # ---- truncate, reuse and save (step thread) ----

    def truncate(self, request: GenerationRequest, runner: Runner) -> None:
        """Cut the session's last reply as the request asks, now that the request runs (its prompt
        was built from the same cut: see `prompt_ids`)."""
        if request.truncation is None or not request.session_id:
            return
        with self._lock:
            session = self._sessions.get(request.session_key)
            if session is not None:
                self._sessions[request.session_key] = _truncated(session, request.truncation, runner)

    def restore(self, request: GenerationRequest, runner: Runner, seq_id: int) -> int:
        """Copy the longest cached prefix of the prompt into the sequence's row; return its length.
        At least the prompt's last token is always left to prefill (its logits start the reply)."""
        with self._lock:
            session = self._sessions.get(request.session_key)
            if session is None or session.kv is None:
                return 0
            self._sessions.move_to_end(request.session_key)
            session.last_used = self.clock()
            prompt = request.prompt_token_ids
            limit = min(len(session.cached_ids), session.kv.length, len(prompt) - 1)
            reuse = 0
            while reuse < limit and session.cached_ids[reuse] == prompt[reuse]:
                reuse += 1
            if reuse:
                runner.load_prefix(seq_id, session.kv, reuse)
            return reuse

    def save(
        self,
        request: GenerationRequest,
        generated: list[int],
        sent_text: list[str],
        runner: Runner,
        seq_id: int,
    ) -> None:
        """Keep the finished turn: its history (the reply as sent) and the KV of prompt + reply."""
        prompt = request.prompt_token_ids
        # The last generated token was never fed back, so its KV does not exist.
        cached = prompt + generated[:-1]
        kv = runner.save_prefix(seq_id, len(cached))
        reply_text = "".join(sent_text)
        with self._lock:
            previous = self._sessions.get(request.session_key)
            if request.input.chat is not None:
                history = list(previous.chat or []) if previous and previous.chat is not None else []
                chat: list[tuple[str, str]] | None = [
                    *history,
                    *request.input.chat,
                    ("assistant", reply_text),
                ]
                history_ids: list[int] = []
            else:
                chat = None
                history_ids = prompt + [t for t in generated if t not in runner.eos_token_ids]
            self._sessions[request.session_key] = _Session(
                chat=chat,
                history_ids=history_ids,
                reply_ids=list(generated),
                last_used=self.clock(),
                cached_ids=cached[: kv.length],
                kv=kv,
            )
            self._sessions.move_to_end(request.session_key)
            self._evict()

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.last_used > self.ttl_s]:
            del self._sessions[key]

    def _evict(self) -> None:
        total = sum(s.kv.nbytes for s in self._sessions.values() if s.kv is not None)
        while total > self.max_bytes and self._sessions:
            _, oldest = self._sessions.popitem(last=False)
            total -= oldest.kv.nbytes if oldest.kv is not None else 0


def _truncated(session: _Session, truncation: SessionTruncation, runner: Runner) -> _Session:
    """The session with its last reply cut to what was heard (characters or tokens)."""
    reply_ids = [t for t in session.reply_ids if t not in runner.eos_token_ids]
    tokenizer = runner.backend_tokenizer
    if truncation.reply_tokens is not None:
        keep_ids = reply_ids[: truncation.reply_tokens]
        heard = tokenizer.decode(keep_ids)
    else:
        chars = truncation.reply_chars or 0
        full = session.chat[-1][1] if session.chat else tokenizer.decode(reply_ids)
        heard = full[:chars]
        keep_ids = reply_ids[: _fitting_prefix(tokenizer, reply_ids, chars)]
    chat, history_ids = session.chat, session.history_ids
    if chat is not None and chat and chat[-1][0] == "assistant":
        chat = [*chat[:-1], ("assistant", heard)]
    elif chat is None:
        history_ids = history_ids[: len(history_ids) - len(reply_ids)] + keep_ids
    return dataclasses.replace(session, chat=chat, history_ids=history_ids, reply_ids=keep_ids)


# How many tokens past the binary search's boundary a longer prefix may still fit (see _fitting_prefix).
_DIP_TOKENS = 16


def _fitting_prefix(tokenizer: Any, ids: list[int], chars: int) -> int:
    """The most tokens of `ids` whose decoded text has at most `chars` characters.

    A binary search over prefix lengths, then a look at the _DIP_TOKENS prefixes just past where it
    ends: O(log n) decodes, O(n log n) tokens decoded. Dropping the last token until the text fit
    decoded every prefix from the longest down, O(n^2): 22 s to cut an 8,000-token reply to nothing.

    The decoded length of a prefix is not monotone: with byte fallback each byte of an unfinished
    character decodes to its own U+FFFD, so "\ufffd\ufffd\ufffd" (3) becomes "😀" (1) when the last
    byte comes. Such a dip lasts only while a character is unfinished (at most 3 byte tokens), so the
    longest fitting prefix is never more than a few tokens past any prefix that does not fit: the
    look past the boundary finds the one the old loop did."""
    n = len(ids)
    if len(tokenizer.decode(ids)) <= chars:  # everything was heard: the common case, one decode
        return n
    low, high = 0, n  # the prefix of `low` tokens fits (none at all always does), `high` does not
    while high - low > 1:
        mid = (low + high) // 2
        if len(tokenizer.decode(ids[:mid])) <= chars:
            low = mid
        else:
            high = mid
    for k in range(min(low + _DIP_TOKENS, n - 1), low, -1):  # longest first, like the old loop
        if len(tokenizer.decode(ids[:k])) <= chars:
            return k
    return low


def _encode_plain(runner: Runner, text: str) -> list[int]:
    """Tokens of text appended to a history (no BOS in the middle of a conversation)."""
    ids = runner.encode(text)
    bos = getattr(runner, "bos_token_id", None)
    return ids[1:] if ids and bos is not None and ids[0] == bos else ids

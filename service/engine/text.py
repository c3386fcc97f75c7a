"""Per-request text: incremental UTF-8-safe detokenizing, stop strings, and chunking."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from tokenwire.service.engine.requests import Chunking
from tokenwire.service.engine.segmenter import Segmenter

__all__ = ["TextPiece", "TextStream", "TextUpdate"]

# Prompt tokens decoded ahead of the first generated one: enough for a SentencePiece (Metaspace)
# decoder to see that the first generated token is not at the start of the text, and so keep
# its leading space; few enough to cost nothing.
_CONTEXT_TOKENS = 4
# Tokens in a row that decode to nothing before the decoder is reset and they are sent as
# replacement characters. A character is at most 4 bytes, so a longer run is invalid UTF-8 (or only
# special tokens), and DecodeStream would otherwise re-decode the whole growing run on every step.
_MAX_SILENT_TOKENS = 16
# How tokenizers' error starts when a decoder's output is not monotonic (vllm#17448); newer
# versions append the token and the texts.
_INVALID_PREFIX = "Invalid prefix encountered"
# Scripts written without spaces between words: WORD chunking may cut after any of these.
_NO_SPACE_SCRIPTS = ((0x2E80, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))


@dataclass(slots=True)
class TextPiece:
    """Text ready to send: valid UTF-8, no broken character, never part of a stop string."""

    text: str
    # True when the piece ends exactly at a sentence/clause boundary (SENTENCE/CLAUSE chunking).
    segment_end: bool = False
    # How many of the pushed tokens, the next ones in order, this piece covers: those whose text
    # starts in it (see `TextStream`). Not compared: pieces are equal when they say the same.
    tokens: int = field(default=0, compare=False)


@dataclass(slots=True)
class TextUpdate:
    """What one generated token released."""

    pieces: list[TextPiece] = field(default_factory=list)  # usually 0 or 1
    # A stop string matched: it and everything after it is never sent, and the request must stop.
    stop_sequence: str | None = None


class TextStream:
    """Turns one request's generated token ids into text pieces, one token at a time.

    Three stages, each holding back only what it must:

    1. `DecodeStream` turns ids into text and returns nothing until a multi-byte character is
       complete. It is primed with the tail of the prompt so the first token keeps its space.
    2. Stop strings: a suffix of the text that could still grow into a stop string is held back
       until it either matches (the text before it is released, the rest dropped) or cannot.
    3. Chunking: TOKEN releases what is ready; WORD holds the unfinished word and the whitespace
       before it; SENTENCE and CLAUSE hold the unfinished segment (see `Segmenter`). Whitespace
       between words or segments starts the next piece, as tokenizers put a word's space at the
       start of its first token. `min_segment_chars` joins short segments to the next one, and
       `fast_first_segment` lets the first SENTENCE segment end at a clause once it is long
       enough to be worth speaking.

    Each token is covered by exactly one piece, the one its text starts in (`TextPiece.tokens`),
    so a chunk's tokens are the ones that made its text whatever the chunking. A token's text
    starts where the text of the tokens before it ends: a token that adds no text of its own (the
    first bytes of a character) goes with the character a later token completes, and a token whose
    text runs on into the next piece counts in the first. Tokens whose text is never released (a
    stop string and what follows it) are in no piece.

    Segments exist only with SENTENCE/CLAUSE chunking: with TOKEN or WORD, `in_segment` is
    always False and no piece has `segment_end`, so an AFTER_SEGMENT interrupt stops at once.

    After a stop string matched, or after `finish`, the stream is closed: `push` returns an
    empty update, `finish` returns [] and `held_text` returns "".
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        chunking: Chunking = Chunking.TOKEN,
        min_segment_chars: int = 0,
        fast_first_segment: bool = False,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._context = _decoder_context(tokenizer, prompt_token_ids)
        self._decoder = DecodeStream(ids=self._context, skip_special_tokens=True)
        self._unfinished: list[int] = []  # ids since the last decoded text: bytes of an unfinished character
        self._decoded = 0  # characters decoded so far
        self._released = 0  # of those, characters released in pieces
        self._starts: deque[int] = deque()  # where the text of each token not yet in a piece starts
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._stop_held = ""
        self._chunking = chunking
        self._word_held = ""
        self._segmenter: Segmenter | None = None
        if chunking in (Chunking.SENTENCE, Chunking.CLAUSE):
            self._segmenter = Segmenter(
                clauses=chunking is Chunking.CLAUSE,
                min_chars=min_segment_chars,
                fast_first=fast_first_segment,
            )
        self._closed = False

    def push(self, token_id: int) -> TextUpdate:
        """Add one generated token (never an EOS or stop-token id); return what it released."""
        if self._closed:
            return TextUpdate()
        waiting = list(self._unfinished)
        text = self._decode(token_id)
        self._starts.append(self._decoded)
        if waiting and text:
            self._place([*waiting, token_id], text)
        self._decoded += len(text)
        if not text:
            return TextUpdate()
        if self._stops:
            text = self._stop_held + text
            matched, at = self._find_stop(text)
            if matched is not None:
                pieces = self._chunk(text[:at])
                pieces.extend(self._flush())
                self._close()
                return TextUpdate(pieces, matched)
            keep = self._stop_prefix_start(text)
            text, self._stop_held = text[:keep], text[keep:]
            if not text:
                return TextUpdate()
        return TextUpdate(self._chunk(text))

    def finish(self, *, complete: bool = True) -> list[TextPiece]:
        """Normal end (EOS, max tokens...): release everything held back.

        `complete` says the text ended on its own (EOS, a stop): its last segment is whole. Cut off by a
        length limit, the flushed tail does not claim segment_end.
        Bytes that never formed a character are sent as replacement characters (U+FFFD), as a
        plain decode of the ids renders them: the chunk then carries those tokens to the client.
        """
        if self._closed:
            return []
        waiting = list(self._unfinished)
        rendered = self._render_unfinished()
        if rendered:
            self._place(waiting, rendered)
        self._decoded += len(rendered)
        text, self._stop_held = self._stop_held + rendered, ""
        pieces = self._chunk(text) if text else []
        pieces.extend(self._flush(complete))
        self._close()
        return pieces

    def held_text(self) -> str:
        """Text generated but not yet released (for an interrupted request's tail)."""
        if self._segmenter is not None:
            return self._segmenter.pending + self._stop_held
        return self._word_held + self._stop_held

    @property
    def in_segment(self) -> bool:
        """True when some non-space text of the current, unfinished segment has been generated."""
        if self._segmenter is None:
            return False
        return self._segmenter.in_segment or bool(self._stop_held.strip())

    # -- stages --

    def _decode(self, token_id: int) -> str:
        try:
            text = self._decoder.step(self._tokenizer, token_id)
        except Exception as e:  # tokenizers raises a bare Exception
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            self._decoder = DecodeStream(ids=self._context, skip_special_tokens=True)
            text = self._decoder.step(self._tokenizer, token_id)
        if text is None:
            self._unfinished.append(token_id)
            if len(self._unfinished) > _MAX_SILENT_TOKENS:
                self._decoder = DecodeStream(ids=self._context, skip_special_tokens=True)
                return self._render_unfinished()
            return ""
        self._unfinished.clear()
        return text

    def _place(self, group: list[int], text: str) -> None:
        """Where in `text` the text of each of `group` starts: the last tokens pushed, whose text
        came out together (all but the last decoded to nothing, or all, when rendered at the end).

        They were placed where `text` starts, which is right for the first bytes of a character.
        But bytes that are not UTF-8 come out as replacement characters of their own (as a decode
        of the tokens alone shows them), so a later token starts after those: at the end of what
        the tokens before it decode to alone, as far as `text` agrees with that, unless the token
        only adds bytes to the unfinished character that ends it (no character more).
        """
        # Their entries are the last ones, all still at self._decoded: they released no text.
        first = len(self._starts) - len(group)
        before = self._decode_alone(group[:1])  # what the group's tokens before token j decode to
        at = 0
        for j in range(1, len(group)):
            upto = self._decode_alone(group[: j + 1])
            start = _common_prefix(text, before)
            joins = len(upto) == len(before) and self._decode_alone(group[j : j + 1]) != ""
            if joins and start == len(before) and before.endswith("\ufffd"):
                start -= 1  # its bytes belong to the unfinished character that ends `before`
            at = max(at, start)
            self._starts[first + j] = self._decoded + at
            before = upto

    def _decode_alone(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _render_unfinished(self) -> str:
        """The ids that decoded to nothing yet, as a plain decode shows them ("\ufffd" per bad byte)."""
        ids, self._unfinished = self._unfinished, []
        return self._decode_alone(ids) if ids else ""

    def _find_stop(self, text: str) -> tuple[str | None, int]:
        """The earliest stop string in `text` (held text plus new), and where it starts."""
        matched: str | None = None
        at = len(text)
        for s in self._stops:
            i = text.find(s, 0, at + len(s) - 1)
            if i != -1 and i < at:
                matched, at = s, i
        return matched, at

    def _stop_prefix_start(self, text: str) -> int:
        """Where the longest suffix of `text` that could begin a stop string starts, else len(text)."""
        n = len(text)
        keep = n
        for s in self._stops:
            i = text.find(s[0], max(0, n - len(s) + 1), keep)
            while i != -1:
                if s.startswith(text[i:]):
                    keep = i
                    break
                i = text.find(s[0], i + 1, keep)
        return keep

    def _chunk(self, text: str) -> list[TextPiece]:
        if self._segmenter is not None:
            return [self._piece(s, True) for s in self._segmenter.feed(text)]
        if self._chunking is Chunking.WORD:
            held = self._word_held
            text = held + text
            cut = _word_cut(text, len(held))
            text, self._word_held = text[:cut], text[cut:]
        return [self._piece(text)] if text else []

    def _flush(self, complete: bool = True) -> list[TextPiece]:
        if self._segmenter is not None:
            rest = self._segmenter.flush()
            return [self._piece(rest, complete)] if rest else []
        rest, self._word_held = self._word_held, ""
        return [self._piece(rest)] if rest else []

    def _piece(self, text: str, segment_end: bool = False) -> TextPiece:
        """Release the next `text`, with the tokens whose text starts in it."""
        self._released += len(text)
        tokens = 0
        while self._starts and self._starts[0] < self._released:
            self._starts.popleft()
            tokens += 1
        return TextPiece(text, segment_end, tokens)

    def _close(self) -> None:
        self._closed = True
        self._stop_held = self._word_held = ""
        self._starts.clear()
        if self._segmenter is not None:
            self._segmenter.flush()


def _decoder_context(tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> list[int]:
    """The prompt's last few ids, without a trailing unfinished character.

    If the primed text ends in bytes that the generated tokens complete, DecodeStream sends the
    whole primed text again; so those bytes are left out (the generated text then starts with a
    replacement character, as a plain decode of the generated ids would).
    """
    ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    while ids and tokenizer.decode(ids, skip_special_tokens=True).endswith("\ufffd"):
        ids.pop()
    return ids


def _word_cut(text: str, start: int) -> int:
    """Where WORD chunking cuts `text`: before its last run of whitespace, or just after its last
    character of a no-space script, whichever comes later.

    Only `text[start:]` is searched: the text before `start` was held back, so its only cut is at 0,
    which is also the answer when there is none.
    """
    for i in range(len(text) - 1, start - 1, -1):
        c = text[i]
        if c.isspace():
            return len(text[: i + 1].rstrip())  # the start of the run (rstrip runs in C)
        if c >= "\u2e80" and any(lo <= ord(c) <= hi for lo, hi in _NO_SPACE_SCRIPTS):
            return i + 1
    return 0


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

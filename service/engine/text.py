"""Per-request text: incremental UTF-8-safe detokenizing, stop strings, and chunking."""

from __future__ import annotations

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
    3. Chunking: TOKEN releases what is ready; WORD holds the unfinished word; SENTENCE and
       CLAUSE hold the unfinished segment (see `Segmenter`; whitespace between segments starts
       the next piece). `min_segment_chars` joins short segments to the next one, and
       `fast_first_segment` lets the first SENTENCE segment end at a clause once it is long
       enough to be worth speaking.

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
        text = self._decode(token_id)
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
        text, self._stop_held = self._stop_held + self._render_unfinished(), ""
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

    def _render_unfinished(self) -> str:
        """The ids that decoded to nothing yet, as a plain decode shows them ("\ufffd" per bad byte)."""
        ids, self._unfinished = self._unfinished, []
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

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
            return [TextPiece(s, True) for s in self._segmenter.feed(text)]
        if self._chunking is Chunking.WORD:
            held = self._word_held
            text = held + text
            cut = _word_cut(text, len(held))
            text, self._word_held = text[:cut], text[cut:]
        return [TextPiece(text)] if text else []

    def _flush(self, complete: bool = True) -> list[TextPiece]:
        if self._segmenter is not None:
            rest = self._segmenter.flush()
            return [TextPiece(rest, complete)] if rest else []
        rest, self._word_held = self._word_held, ""
        return [TextPiece(rest)] if rest else []

    def _close(self) -> None:
        self._closed = True
        self._stop_held = self._word_held = ""
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
    """Index just after the last whitespace (or no-space-script character) at or after `start`.

    Returns 0 when there is none: everything before `start` is known to hold none.
    """
    for i in range(len(text) - 1, start - 1, -1):
        c = text[i]
        if c.isspace() or (c >= "\u2e80" and any(lo <= ord(c) <= hi for lo, hi in _NO_SPACE_SCRIPTS)):
            return i + 1
    return 0

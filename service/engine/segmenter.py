"""Streaming sentence and clause segmentation of generated text, for speech-ready chunks."""

from __future__ import annotations

import re

# pysbd's maintained English lists: which words before a period are abbreviations, and which
# words start a sentence after a multi-period one ("U.S. He ..." vs "U.S. Army").
from pysbd.lang.english import English

__all__ = ["FAST_FIRST_MIN_CHARS", "Segmenter"]

# With fast_first, the first segment may end at a clause boundary once it is this long: long
# enough to be worth speaking, short enough to start speech after a handful of tokens.
FAST_FIRST_MIN_CHARS = 20

_PREPOSITIVE = frozenset(English.Abbreviation.PREPOSITIVE_ABBREVIATIONS)
_ABBREVIATIONS = frozenset(English.Abbreviation.ABBREVIATIONS) | frozenset(
    English.Abbreviation.NUMBER_ABBREVIATIONS
)
# pysbd's starters, plus common ones a chat model opens with after "a.m." / "U.S." / "e.g.".
_SENTENCE_STARTERS = frozenset(English.AbbreviationReplacer.SENTENCE_STARTERS) | {
    "After", "And", "But", "If", "My", "Our", "So", "Then", "These", "This", "Those", "You", "Your",
}  # fmt: skip

_TERMINALS = ".!?…。！？"
_WIDE_TERMINALS = "。！？"  # CJK full stops: no space follows them
_CLOSERS = "\"'”’)]}»」』）*"  # "*" closes markdown emphasis: **Done.** Next
_OPENERS = "\"'“‘([{«「『（*$"
_WIDE_COMMAS = "，、；："
# After ". " these cannot start a new sentence.
_NON_STARTERS = ",;:.!?)]}%"

_C = re.escape(_CLOSERS)
_SENTENCE_RE = re.compile(rf"\n|[{_TERMINALS}]+[{_C}]*")
# Dashes: em/en dash anywhere; an ASCII hyphen pair or single hyphen only between spaces.
_CLAUSE_RE = re.compile(rf"\n|[{_TERMINALS}]+[{_C}]*|[,;:{_WIDE_COMMAS}]+[{_C}]*|[—–]+|(?<=[ \t])--?")

_NEED_MORE = -2  # a verdict: the boundary cannot be decided until more text arrives
_NO = -1


class Segmenter:
    """Cuts a stream of text into sentences (or clauses) as it arrives.

    `feed` returns the segments completed so far; each ends exactly at a boundary: after the
    closing punctuation and any closing quotes/brackets, or just before a newline. Whitespace
    between segments goes at the START of the next segment ("Hi." then " How are you?"), so a
    segment is released as soon as its boundary is certain, without waiting for more spaces.

    A boundary after a period is only certain once the next non-space character is known (it
    rules out "Dr. Smith", "e.g. apples", "3.14", "1. First item"), so the segmenter holds that
    little lookahead; a few cases ("U.S. He" vs "U.S. Army") wait for the next whole word. Every
    decision depends only on the text, never on how it was split into tokens, so any split of
    the same text yields the same segments. Cost is a regex search over the new text, plus a few
    string checks at each punctuation mark.
    """

    def __init__(self, *, clauses: bool = False, min_chars: int = 0, fast_first: bool = False) -> None:
        self._clauses = clauses
        self._min_chars = min_chars
        self._fast_first = fast_first and not clauses
        self._buf = ""  # text not yet released
        self._scan = 0  # where the search for the next candidate boundary resumes
        self._seg_start = 0  # start of the current sentence (after a boundary too short to release)
        self._released_any = False

    @property
    def pending(self) -> str:
        """Text fed but not yet released."""
        return self._buf

    @property
    def in_segment(self) -> bool:
        """True when some non-space text of the unfinished segment has been fed."""
        return not self._buf.isspace() and self._buf != ""

    def feed(self, text: str) -> list[str]:
        """Add text; return the segments it completes (often none)."""
        self._buf += text
        out: list[str] = []
        while True:
            clause_mode = self._clauses or (self._fast_first and not self._released_any)
            pattern = _CLAUSE_RE if clause_mode else _SENTENCE_RE
            m = pattern.search(self._buf, self._scan)
            if m is None:
                self._scan = len(self._buf)
                return out
            cut = self._decide(m)
            if cut == _NEED_MORE:
                self._scan = m.start()
                return out
            if cut == _NO:
                self._scan = m.end()
                continue
            if len(self._buf[:cut].strip()) < max(self._min_chars, 1):
                # Too short to speak alone: it joins the next segment.
                self._scan = self._seg_start = m.end()
                continue
            out.append(self._buf[:cut])
            self._buf = self._buf[cut:]
            self._scan = self._seg_start = 0 if cut == m.start() else m.end() - cut
            self._released_any = True

    def flush(self) -> str:
        """End of text: release everything held (may be "")."""
        rest, self._buf = self._buf, ""
        self._scan = self._seg_start = 0
        return rest

    def _decide(self, m: re.Match[str]) -> int:
        """Where the segment ends for this candidate: a cut index, _NO, or _NEED_MORE."""
        buf = self._buf
        start, end = m.span()
        mark = buf[start]
        if mark == "\n":
            cut = start - 1 if start and buf[start - 1] == "\r" else start
            return cut if self._has_text(cut) else _NO
        if end == len(buf):
            return _NEED_MORE  # the run of punctuation (or its closers) may continue
        if not self._has_text(start):
            return _NO
        nxt = buf[end]
        if mark in _TERMINALS:
            if mark in _WIDE_TERMINALS:
                return end
            if not nxt.isspace():
                return _NO  # 3.14  e.g.,  file.txt
            return self._after_terminal(m)
        # A clause mark: comma, semicolon, colon or dash.
        if mark not in _WIDE_COMMAS and mark not in "—–" and not nxt.isspace():
            return _NO  # 1,000  10:30  x--y
        if not self._clauses and len(buf[:end].strip()) < FAST_FIRST_MIN_CHARS:
            return _NO  # fast_first: too short to be worth speaking on its own
        return end

    def _after_terminal(self, m: re.Match[str]) -> int:
        """Terminal punctuation followed by a space: look at what the next word starts with."""
        buf = self._buf
        start, end = m.span()
        q = end
        while q < len(buf) and buf[q].isspace():
            if buf[q] == "\n":
                return end
            q += 1
        if q == len(buf):
            return _NEED_MORE
        first = buf[q]
        if first.islower() or first in _NON_STARTERS:
            return _NO  # "e.g. apples", "Wait... what?", '"Really?" he asked.'
        punct = m.group().rstrip(_CLOSERS)
        if punct != ".":
            return end  # ! ? or an ellipsis, then a capital
        return self._after_period(start, q, end)

    def _after_period(self, dot: int, q: int, end: int) -> int:
        """A single period, then space, then at q a character that may start a sentence."""
        buf = self._buf
        w = dot
        while w > self._seg_start and not buf[w - 1].isspace():
            w -= 1
        word = buf[w:dot].lstrip(_OPENERS).lower()
        if not word:
            return end
        if word in _PREPOSITIVE:
            return _NO  # Dr. Smith, Mt. Everest, vs. B, Fig. 3
        if buf[q].isdigit() and word in _ABBREVIATIONS:
            return _NO  # No. 5, Jan. 5, p. 12
        lead = buf[self._seg_start : w].rstrip()
        if _is_list_marker(word) and (not lead or lead[-1] == ":"):
            return _NO  # "1. First item", "a. Apples", "iv. Four", "Steps: 1. Mix"
        if len(word) == 1 and word.isalpha() and word != "i":
            return _NO  # an initial: J. Smith, Plan B. Then
        if "." in word and word.replace(".", "").isalpha():
            # e.g.  U.S.  p.m.  Ph.D.: a boundary only if a sentence starter follows.
            k = q
            while k < len(buf) and buf[k].isalpha():
                k += 1
            if k == len(buf):
                return _NEED_MORE
            return end if buf[q:k] in _SENTENCE_STARTERS else _NO
        return end

    def _has_text(self, end: int) -> bool:
        """Whether the current sentence has non-space text before `end`."""
        return not self._buf[self._seg_start : end].isspace() and end > self._seg_start


def _is_list_marker(word: str) -> bool:
    """1  12  a  iv: what numbers an item when it starts a line."""
    if word.isdigit():
        return len(word) <= 3
    return len(word) == 1 or (len(word) <= 4 and all(c in "ivx" for c in word))

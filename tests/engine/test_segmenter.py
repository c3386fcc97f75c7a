"""Sentence/clause segmentation of streamed text: hard cases, under every way of splitting the text."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire.service.engine.segmenter import FAST_FIRST_MIN_CHARS, Segmenter


def segment(parts: list[str], **options: object) -> list[str]:
    seg = Segmenter(**options)  # type: ignore[arg-type]
    out: list[str] = []
    for part in parts:
        out.extend(seg.feed(part))
    rest = seg.flush()
    if rest:
        out.append(rest)
    return out


def cut(text: str, rng: random.Random, at_most: int) -> list[str]:
    """The text cut at up to `at_most` random places."""
    k = min(max(len(text) - 1, 0), rng.randint(1, at_most))
    cuts = sorted(rng.sample(range(1, len(text)), k)) if k else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def splits(text: str, seed: int = 0) -> Iterator[list[str]]:
    """The text whole, char by char, cut once at every position, and cut at random places."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(20):
        yield cut(text, rng, 8)


SENTENCES = [
    # abbreviations and titles
    ("Dr. Smith is here. He said hi.", ["Dr. Smith is here.", " He said hi."]),
    ("Mr. Jones came. Mrs. Jones too.", ["Mr. Jones came.", " Mrs. Jones too."]),
    ("I saw Mt. Everest. It was big.", ["I saw Mt. Everest.", " It was big."]),
    ("See Fig. 3 for details. Thanks.", ["See Fig. 3 for details.", " Thanks."]),
    ("See No. 5 here. Done.", ["See No. 5 here.", " Done."]),
    ("J. R. R. Tolkien wrote it. True.", ["J. R. R. Tolkien wrote it.", " True."]),
    ("Use e.g. apples. Or pears.", ["Use e.g. apples.", " Or pears."]),
    ("Use e.g. Apples or pears.", ["Use e.g. Apples or pears."]),
    ("Fruit, i.e. Apples. Yes.", ["Fruit, i.e. Apples.", " Yes."]),
    ("The U.S. Army is big. Really.", ["The U.S. Army is big.", " Really."]),
    ("I live in the U.S. He lives in Canada.", ["I live in the U.S.", " He lives in Canada."]),
    ("It was 5 p.m. When we left, it rained.", ["It was 5 p.m.", " When we left, it rained."]),
    ("Meet at 5 p.m. tomorrow. Bye.", ["Meet at 5 p.m. tomorrow.", " Bye."]),
    # numbers, money, versions
    ("Pi is 3.14 roughly. Yes.", ["Pi is 3.14 roughly.", " Yes."]),
    ("Pi is 3.14. Next we go.", ["Pi is 3.14.", " Next we go."]),
    ("It costs $29.99 today. Buy it.", ["It costs $29.99 today.", " Buy it."]),
    ("It costs $29. Buy it.", ["It costs $29.", " Buy it."]),
    ("Version 2.0 is out. Get it.", ["Version 2.0 is out.", " Get it."]),
    ("Born in 1990. The end", ["Born in 1990.", " The end"]),
    # numbered lists and newlines
    (
        "Steps:\n1. First item\n2. Second item\n10. Tenth.",
        ["Steps:", "\n1. First item", "\n2. Second item", "\n10. Tenth."],
    ),
    ("1. First item. 2. Second item.", ["1. First item.", " 2. Second item."]),
    ("Steps: 1. Mix. 2. Bake.", ["Steps: 1. Mix.", " 2. Bake."]),
    ("a. Apples\nb. Pears", ["a. Apples", "\nb. Pears"]),
    ("Hello world\n\nNew paragraph here.", ["Hello world", "\n\nNew paragraph here."]),
    ("Line one\r\nLine two", ["Line one", "\r\nLine two"]),
    ("The end.\n", ["The end.", "\n"]),
    ("Title\n\n\n", ["Title", "\n\n\n"]),
    ("\n\nLeading blank lines. Then text.", ["\n\nLeading blank lines.", " Then text."]),
    # ellipses, ! and ?
    ("Wait... what? Really!", ["Wait... what?", " Really!"]),
    ("Hmm... I see. OK.", ["Hmm...", " I see.", " OK."]),
    ("Hmm… I see.", ["Hmm…", " I see."]),
    ("Really?! Yes.", ["Really?!", " Yes."]),
    ("Is it? yes it is.", ["Is it? yes it is."]),
    # quotes and brackets stay with their sentence
    ('He said "Hello." Then he left.', ['He said "Hello."', " Then he left."]),
    ('"Really?" he asked. Yes.', ['"Really?" he asked.', " Yes."]),
    ("(Done.) Next one.", ["(Done.)", " Next one."]),
    ("**Note.** This matters.", ["**Note.**", " This matters."]),
    ("She said ‘no.’ Then left.", ["She said ‘no.’", " Then left."]),
    # no space after the period: not a boundary
    ("Email a.b@example.com. Thanks!", ["Email a.b@example.com.", " Thanks!"]),
    ("Open file.txt. Then run it.", ["Open file.txt.", " Then run it."]),
    ("x.y.z and more", ["x.y.z and more"]),
    # scripts without spaces
    ("你好。我很好！谢谢。", ["你好。", "我很好！", "谢谢。"]),
    ("「你好。」他说。", ["「你好。」", "他说。"]),
    # nothing to cut
    ("", []),
    ("   ", ["   "]),
    ("no punctuation at all", ["no punctuation at all"]),
]

CLAUSES = [
    (
        "Well, I think so; maybe: yes — or no - who knows? Fine.",
        ["Well,", " I think so;", " maybe:", " yes —", " or no -", " who knows?", " Fine."],
    ),
    ("It has 1,000 items at 10:30, see.", ["It has 1,000 items at 10:30,", " see."]),
    ('"Hello," he said.', ['"Hello,"', " he said."]),
    ("A well-known x--y fact, ok", ["A well-known x--y fact,", " ok"]),
    ("I went—no, I ran.", ["I went—", "no,", " I ran."]),
    ("你好，世界。", ["你好，", "世界。"]),
    ("Dr. Smith, e.g., agreed.", ["Dr. Smith,", " e.g.,", " agreed."]),
]


@pytest.mark.parametrize(("text", "expected"), SENTENCES)
def test_sentences(text: str, expected: list[str]) -> None:
    for parts in splits(text):
        assert segment(parts) == expected, parts


@pytest.mark.parametrize(("text", "expected"), CLAUSES)
def test_clauses(text: str, expected: list[str]) -> None:
    for parts in splits(text):
        assert segment(parts, clauses=True) == expected, parts


def test_min_chars_joins_short_segments() -> None:
    text = "Hi. Yes. This one is long enough. Ok."
    assert segment([text]) == ["Hi.", " Yes.", " This one is long enough.", " Ok."]
    for parts in splits(text):
        assert segment(parts, min_chars=10) == ["Hi. Yes. This one is long enough.", " Ok."]
    assert segment([text], min_chars=100) == [text]


def test_fast_first_ends_the_first_segment_at_a_clause() -> None:
    text = "Sure, here is what I found, in short: the answer, as far as I know, is yes. Then, more."
    expected = [
        "Sure, here is what I found,",  # the first clause boundary past FAST_FIRST_MIN_CHARS
        " in short: the answer, as far as I know, is yes.",
        " Then, more.",
    ]
    assert len("Sure, here is what I found,") >= FAST_FIRST_MIN_CHARS > len("Sure,")
    for parts in splits(text):
        assert segment(parts, fast_first=True) == expected
    # Without a clause boundary late enough, the first sentence is whole.
    assert segment(["Yes, sure. Then, more."], fast_first=True) == ["Yes, sure.", " Then, more."]


def test_lookahead_holds_only_what_is_undecided() -> None:
    seg = Segmenter()
    assert seg.feed("Dr") == []
    assert seg.feed(".") == []  # "Dr." may end a sentence or not
    assert seg.feed(" ") == []
    assert seg.feed("S") == []  # "Dr. S": a title, not a boundary
    assert seg.feed("mith is here.") == []
    assert seg.pending == "Dr. Smith is here."
    assert seg.feed(" H") == ["Dr. Smith is here."]  # confirmed by the capital
    assert seg.pending == " H"
    assert seg.feed("i!\n") == [" Hi!"]  # a newline needs no lookahead
    assert seg.pending == "\n"
    assert not seg.in_segment  # only whitespace since the last segment
    assert seg.feed("O") == []
    assert seg.in_segment
    assert seg.flush() == "\nO"
    assert seg.pending == ""


# Fragments that make the hard cases likely when strung together at random.
_FRAGMENTS = [
    "Dr", "Mr", ".", ". ", " ", "  ", "Smith", "smith", "3", "14", "$29", "\n", "\n\n", "?", "!", "\"",
    "”", ")", "(", ",", ";", ":", "e.g", "U.S", "p.m", "A", "a", "I", "—", " - ", "-", "。", "，", "…",
    "...", "1", "10", "He", "The", "No", "**", "é", "🦜",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    fragments=st.lists(st.sampled_from(_FRAGMENTS), max_size=40),
    cut_seed=st.integers(0, 2**32 - 1),
    options=st.sampled_from(
        [{}, {"clauses": True}, {"min_chars": 12}, {"fast_first": True}, {"clauses": True, "min_chars": 5}]
    ),
)
def test_any_split_gives_the_same_segments(
    fragments: list[str], cut_seed: int, options: dict[str, object]
) -> None:
    text = "".join(fragments)
    whole = segment([text], **options)
    assert "".join(whole) == text
    assert all(whole)
    assert all(s.strip() for s in whole[:-1])  # only the last may be whitespace alone
    assert segment(fragments, **options) == whole
    assert segment(list(text), **options) == whole
    assert segment(cut(text, random.Random(cut_seed), 6), **options) == whole


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80), cut_seed=st.integers(0, 2**32 - 1))
def test_any_text_is_kept_whole(text: str, cut_seed: int) -> None:
    whole = segment([text], clauses=True)
    assert "".join(whole) == text
    assert all(whole)
    assert segment(cut(text, random.Random(cut_seed), 6), clauses=True) == whole

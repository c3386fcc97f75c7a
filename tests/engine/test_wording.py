"""Counts and client-chosen ids as log lines and messages show them (service/wording.py)."""

from __future__ import annotations

from tokenwire.service.engine.wording import MAX_SHOWN_ID_CHARS, plural, shown_id


def test_plural() -> None:
    assert plural(0, "token") == "0 tokens"
    assert plural(1, "token") == "1 token"
    assert plural(2, "live request") == "2 live requests"
    assert plural(1_024, "thread") == "1,024 threads"
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"


def test_shown_id_is_escaped() -> None:
    assert shown_id("r-1") == "'r-1'"
    forged = "a\n2024-01-01 00:00:00 INFO tokenwire: fake line\r\x1b[2J"
    shown = shown_id(forged)
    assert not any(c in shown for c in "\n\r\x1b") and shown == repr(forged)


def test_shown_id_is_capped_saying_so() -> None:
    assert shown_id("x" * MAX_SHOWN_ID_CHARS) == repr("x" * MAX_SHOWN_ID_CHARS)
    shown = shown_id("y" * 1_000_000 + "\n")
    assert shown == f"{'y' * MAX_SHOWN_ID_CHARS!r}... (cut: 1,000,001 characters)"

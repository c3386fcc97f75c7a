"""How values are worded in log lines and messages: counts, and the ids clients choose.

Plain Python, for the engine and the transport (the floors below word their few counts themselves).
"""

from __future__ import annotations

__all__ = ["MAX_SHOWN_ID_CHARS", "plural", "shown_id"]

# The longest id the contract allows (Start.request_id, session_id): a longer one is shown cut to this.
MAX_SHOWN_ID_CHARS = 128


def plural(count: int, word: str, many: str | None = None) -> str:
    """`count` and the noun to go with it: "1 token", "2 tokens", "1,024 tokens" (`many`: an
    irregular plural)."""
    return f"{count:,} {word if count == 1 else many or word + 's'}"


def shown_id(value: str) -> str:
    """A client-chosen id as a log line or message may show it: quoted and escaped like repr(), so a
    newline or another control character in it cannot end the line and forge the next, and cut to
    MAX_SHOWN_ID_CHARS characters, saying how long it was, so a client cannot make a line any size."""
    if len(value) <= MAX_SHOWN_ID_CHARS:
        return repr(value)
    return f"{value[:MAX_SHOWN_ID_CHARS]!r}... (cut: {plural(len(value), 'character')})"

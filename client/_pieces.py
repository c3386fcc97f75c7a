"""The bytes behind Tokenize's pieces, for `tokenwire tokenize` to show.

The server sends each token's text decoded alone. A byte-level tokenizer splits characters it has no
token for into byte tokens, and such a token decodes alone to U+FFFD, which says nothing of its bytes.
They are recovered by lining the pieces up with the UTF-8 bytes of the text that was tokenized: a
piece that decodes cleanly stands for its own bytes, and a piece holding U+FFFD for the next bytes of
the text that decode (with replacement) to exactly that piece.
"""

from __future__ import annotations

from collections.abc import Sequence

_REPLACEMENT = "\ufffd"
_BEFORE, _IN, _AFTER = 0, 1, 2  # where a piece lies: before the text (template, BOS), in it, after it
_State = tuple[int, int]  # (where, bytes of the text consumed)


def _decodes_to(data: bytes, piece: str) -> bool:
    return data.decode("utf-8", errors="replace") == piece


def piece_bytes(text: str, pieces: Sequence[str]) -> list[bytes] | None:
    """Each piece's bytes, or None when the pieces do not line up with `text`.

    `text` may be only part of what was tokenized: pieces before and after it (a chat template's own
    text, a BOS token) must decode cleanly, and one may straddle the text's start or end. Where the
    pieces line up more than one way, the first way found (shortest bytes first) is taken."""
    source = text.encode()
    end = len(source)
    # Per piece, each state reached -> (the state it came from, the bytes the piece stands for).
    steps: list[dict[_State, tuple[_State, bytes]]] = []
    states: list[_State] = [(_BEFORE, 0)]
    for piece in pieces:
        reached: dict[_State, tuple[_State, bytes]] = {}
        for state in states:
            for after, data in _moves(piece, state, source):
                reached.setdefault(after, (state, data))
                if after == (_IN, end):  # the text is all consumed: what follows is after it
                    reached.setdefault((_AFTER, end), (state, data))
        if not reached:
            return None
        steps.append(reached)
        states = list(reached)
    final = next((s for s in ((_AFTER, end), (_IN, end)) if s in states), None)
    if final is None or not pieces:
        return None
    found: list[bytes] = []
    state = final
    for reached in reversed(steps):
        state, data = reached[state]
        found.append(data)
    found.reverse()
    return found


def _moves(piece: str, state: _State, source: bytes) -> list[tuple[_State, bytes]]:
    """Where `piece` can take the alignment from `state`, and the bytes it stands for there."""
    where, at = state
    end = len(source)
    clean = _REPLACEMENT not in piece
    data = piece.encode()
    moves: list[tuple[_State, bytes]] = []
    if where == _BEFORE:
        moves.extend(_moves(piece, (_IN, 0), source))  # the text may start with this piece
        if clean:
            moves.append(((_BEFORE, 0), data))
            for cut in range(1, len(data)):  # the piece ends the template and starts the text
                rest = data[cut:]
                if source.startswith(rest):
                    moves.append(((_IN, len(rest)), data))
                elif rest.startswith(source) and end:
                    moves.append(((_AFTER, end), data))
    elif where == _IN:
        if clean:
            if source.startswith(data, at):
                moves.append(((_IN, at + len(data)), data))
            elif at < end and data.startswith(source[at:]):  # ends the text and starts what follows
                moves.append(((_AFTER, end), data))
        else:
            # One U+FFFD stands for 1 to 3 bytes, any other character for at most 4.
            for size in range(1, min(4 * len(piece), end - at) + 1):
                if _decodes_to(source[at : at + size], piece):
                    moves.append(((_IN, at + size), source[at : at + size]))
    elif clean:  # after the text
        moves.append(((_AFTER, end), data))
    return moves


def show_piece(data: bytes) -> str:
    """A token's bytes for a terminal: its text quoted (repr), and bytes that are not whole UTF-8
    characters as <0xF0> (the spelling of byte tokens in SentencePiece vocabularies)."""
    shown: list[str] = []
    run: list[str] = []
    for char in data.decode("utf-8", errors="surrogateescape"):
        if "\udc80" <= char <= "\udcff":  # surrogateescape's stand-in for the byte 0x80-0xff
            if run:
                shown.append(repr("".join(run)))
                run = []
            shown.append(f"<0x{ord(char) - 0xDC00:02X}>")
        else:
            run.append(char)
    if run or not shown:
        shown.append(repr("".join(run)))
    return "".join(shown)

"""A Pipecat context as tokenwire chat turns, and what a tokenwire session already holds of it.

Plain Python (no pipecat, no grpc), so the bookkeeping is tested as tables. Pipecat keeps the whole
conversation in its LLMContext and hands all of it over every turn; a tokenwire session keeps it
server-side and wants only the turn's new messages. `SessionLedger` tracks which context messages the
session holds, so each turn sends only what is new, and starts a fresh session whenever the context
no longer extends what the session holds (edited, reset, or a system prompt changed).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Turn = tuple[str, str]  # (role, content)


def chat_turns(messages: Iterable[Mapping[str, Any]]) -> list[Turn]:
    """OpenAI-format messages (what Pipecat's OpenAI adapter makes of a context) as (role, text) turns.

    Content given as a list of parts keeps its text parts, joined; images and audio are dropped.
    "developer" is sent as "system". Tool calls and tool results are dropped: tokenwire has no
    function calling, and a chat template would refuse the "tool" role."""
    turns: list[Turn] = []
    for message in messages:
        role = str(message.get("role", ""))
        if role == "tool" or (role == "assistant" and message.get("tool_calls")):
            continue
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text"
            )
        else:
            text = ""
        turns.append(("system" if role == "developer" else role, text))
    return turns


def heard_prefix(reply: str, reported: str) -> int:
    """How many characters of `reply` the pipeline reports as spoken, when `reported` is its text of
    the reply (the assistant message Pipecat's aggregator put in the context): the end, in `reply`, of
    the longest prefix of `reported` it matches, whitespace ignored (aggregators strip and re-join
    spaces). Past the first character that differs nothing is counted as heard."""
    position = matched_end = 0
    for char in reported:
        if char.isspace():
            continue
        while position < len(reply) and reply[position].isspace():
            position += 1
        if position >= len(reply) or reply[position] != char:
            break
        position += 1
        matched_end = position
    return matched_end


@dataclass
class Reply:
    """What became of the session's last reply: the text the server kept, and what was pushed."""

    kept_chars: int  # the server's copy: Finished.sent_text_chars (the reply as sent)
    pushed: str  # the text pushed downstream as text frames (before any interruption)


@dataclass
class SessionLedger:
    """Which messages of the pipeline's context a tokenwire session holds."""

    session_id: str = ""
    held: list[Turn] = field(default_factory=list)  # context messages the session holds, in order
    replies: set[int] = field(default_factory=set)  # indexes in `held` of the session's own replies
    last_reply: Reply | None = None  # the reply of the last turn, not yet matched to a context message

    def next_turn(self, context: Sequence[Turn], prefix: str = "pipecat") -> tuple[list[Turn], int | None]:
        """The messages to send for this turn and the truncation (characters of the last reply to keep,
        or None) to send with them. Starts a new session (a new `session_id`, everything sent) when
        the context does not extend what the session holds."""
        held = len(self.held)
        extends = (
            self.session_id != ""
            and len(context) >= held
            and all(i in self.replies or context[i] == self.held[i] for i in range(held))
        )
        truncate: int | None = None
        if extends and self.last_reply is not None:
            reply = self.last_reply
            heard = len(reply.pushed)
            if held < len(context) and context[held][0] == "assistant":
                # The pipeline's own account of what was said (its aggregator's assistant message).
                heard = min(heard, heard_prefix(reply.pushed, context[held][1]))
                self.held.append(context[held])
                self.replies.add(held)
            # Without an assistant message (an app that keeps no replies) what was pushed stands.
            if heard < reply.kept_chars:
                truncate = heard
        new = list(context[len(self.held) :]) if extends else []
        if not new:
            # Nothing new to add to the session (or no session yet): start one with the whole context.
            self.session_id = f"{prefix}-{uuid.uuid4().hex}"
            self.held, self.replies, truncate = [], set(), None
            new = list(context)
        self.held.extend(new)
        self.last_reply = None
        return new, truncate

    def replied(self, reply: Reply) -> None:
        """The turn ended and the session kept its reply (any stop but an error)."""
        self.last_reply = reply

    def forget(self) -> None:
        """The turn failed: the session may not hold it; the next turn starts a new one."""
        self.session_id = ""
        self.held, self.replies, self.last_reply = [], set(), None

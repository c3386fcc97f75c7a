"""The Pipecat service's bookkeeping as tables: context messages as chat turns, the heard prefix of a
reply, and which turns a tokenwire session already holds."""

from __future__ import annotations

import pytest

from tokenwire.integrations.pipecat import TokenWireLLMService, chat_turns, heard_prefix
from tokenwire.integrations.pipecat._conversation import Reply, SessionLedger


def test_chat_turns() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image_url"},
                                     {"type": "text", "text": "a cat"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
        {"role": "assistant", "content": "A cat."},
    ]  # fmt: skip
    assert chat_turns(messages) == [("system", "Be brief."), ("user", "Look: a cat"), ("assistant", "A cat.")]


@pytest.mark.parametrize(
    "reply,reported,heard",
    [
        (" Hello world. How are", "Hello world. How are", 21),  # the aggregator stripped the space
        (" Hello world. How are", "Hello world.", 13),
        (" Hello world. How are", "Hello  world.  How", 17),  # re-joined with other spaces
        (" Hello world.", "", 0),
        (" Hello world.", "Hello there", 6),  # stops at the first character that differs
        (" Hello world.", "Hello world. And more", 13),  # never past the reply
    ],
)
def test_heard_prefix(reply: str, reported: str, heard: int) -> None:
    assert heard_prefix(reply, reported) == heard


def test_a_session_gets_only_new_turns_and_the_heard_part_of_the_last_reply() -> None:
    ledger = SessionLedger()
    sent, truncate = ledger.next_turn([("system", "Be brief."), ("user", "Hi")])
    assert sent == [("system", "Be brief."), ("user", "Hi")] and truncate is None
    first = ledger.session_id
    # Interrupted: " Hello there. How" was sent, " Hello there." pushed, "Hello" spoken.
    ledger.replied(Reply(kept_chars=len(" Hello there. How"), pushed=" Hello there."))
    context = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Again")]
    assert ledger.next_turn(context) == ([("user", "Again")], len(" Hello"))
    assert ledger.session_id == first
    # A turn that ran to its end and was recorded whole: nothing to cut.
    ledger.replied(Reply(kept_chars=len(" Fine."), pushed=" Fine."))
    context += [("assistant", "Fine."), ("user", "Bye")]
    assert ledger.next_turn(context) == ([("user", "Bye")], None)
    # No assistant message recorded (an app that keeps none): what was pushed stands.
    ledger.replied(Reply(kept_chars=10, pushed=" Bye now"))
    context += [("user", "Wait")]
    assert ledger.next_turn(context) == ([("user", "Wait")], len(" Bye now"))
    assert ledger.session_id == first


@pytest.mark.parametrize(
    "second_context",
    [
        [("system", "Be long."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Again")],  # edited
        [("user", "Again")],  # reset
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")],  # nothing new to send
    ],
)
def test_a_context_that_does_not_extend_the_session_starts_a_new_one(
    second_context: list[tuple[str, str]],
) -> None:
    ledger = SessionLedger()
    ledger.next_turn([("system", "Be brief."), ("user", "Hi")])
    first = ledger.session_id
    ledger.replied(Reply(kept_chars=6, pushed=" Hello"))
    assert ledger.next_turn(second_context) == (second_context, None)
    assert ledger.session_id != first


def test_a_failed_turn_starts_a_new_session() -> None:
    ledger = SessionLedger()
    ledger.next_turn([("user", "Hi")])
    first = ledger.session_id
    ledger.forget()
    assert ledger.next_turn([("user", "Hi"), ("user", "Again")]) == (
        [("user", "Hi"), ("user", "Again")],
        None,
    )
    assert ledger.session_id != first


def test_the_service_shadows_nothing_of_pipecats_llm_service() -> None:
    # A private name of ours that a Pipecat base class also uses (as `_start` once did) breaks it.
    from pipecat.services.llm_service import LLMService

    class Plain(LLMService):  # type: ignore[misc]
        pass

    theirs = {name for cls in LLMService.__mro__ for name in vars(cls)} | set(vars(Plain()))
    ours = set(vars(TokenWireLLMService)) | set(vars(TokenWireLLMService(address="127.0.0.1:1")))
    ours -= set(vars(Plain()))  # what the base class's __init__ set on our instance
    overridden = {"process_frame", "stop", "cancel", "can_generate_metrics", "_abc_impl"}
    assert {n for n in ours & theirs if not n.startswith("__")} == overridden

"""Sessions over the real runner (tiny model): exact prefix reuse, truncation, isolation, expiry."""

from __future__ import annotations

import time

import pytest

from tests.models import runner_and_reference, tiny_model, tokenizer
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    Delta,
    ErrorCode,
    Finished,
    GenerationRequest,
    PromptInput,
    RequestError,
    SessionTruncation,
    Started,
    StoppingParams,
    StopReason,
)

HISTORY = (
    ("system", "You are terse."),
    ("user", "Name three rivers in Europe and say one thing about each."),
)
QUESTION = (("user", "Which one is the longest?"),)


async def turn(
    engine: Engine, request_id: str, chat: tuple[tuple[str, str], ...], session: str = "", **kw: object
) -> tuple[GenerationRequest, Started, str, list[int], Finished]:
    request = GenerationRequest(
        request_id,
        PromptInput(chat=chat),
        stopping=StoppingParams(max_tokens=12, ignore_eos=True),
        session_id=session,
        **kw,  # type: ignore[arg-type]
    )
    started, text, tokens, finished = None, "", [], None
    async for item in engine.add_request(request):
        if isinstance(item, Started):
            started = item
        elif isinstance(item, Delta):
            text += item.text
            tokens.extend(item.token_ids)
        elif isinstance(item, Finished):
            finished = item
    assert started is not None and finished is not None
    return request, started, text, tokens, finished


@pytest.fixture
async def engine():
    runner, _ = runner_and_reference(tiny_model())
    engine = Engine(runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=64, session_ttl_s=60))
    engine.start()
    yield engine
    await engine.stop()


async def test_second_turn_reuses_the_prefix_and_matches_a_fresh_prefill(engine: Engine) -> None:
    first, started1, reply, _, _ = await turn(engine, "t1", HISTORY, "conv")
    assert started1.cached_prompt_tokens == 0
    second, started2, text2, tokens2, finished2 = await turn(engine, "t2", QUESTION, "conv")
    # The first turn's prompt came from the cache (the history is re-rendered as text, so the token
    # where the reply joins "assistant\n" may tokenize differently: reuse stops at the first change).
    assert started2.cached_prompt_tokens >= len(first.prompt_token_ids) - 1
    assert finished2.usage.cached_prompt_tokens == started2.cached_prompt_tokens
    # The same conversation sent whole, without a session, gives the same prompt and the same tokens.
    full = (*HISTORY, ("assistant", reply), *QUESTION)
    fresh, started3, text3, tokens3, _ = await turn(engine, "t3", full)
    assert started3.cached_prompt_tokens == 0
    assert fresh.prompt_token_ids == second.prompt_token_ids
    assert (tokens3, text3) == (tokens2, text2)


async def test_truncate_to_heard_removes_the_unheard_reply(engine: Engine) -> None:
    _, _, reply, _, _ = await turn(engine, "t1", HISTORY, "conv")
    assert len(reply) > 8
    heard = reply[:5]
    request, started, _, _, _ = await turn(
        engine, "t2", QUESTION, "conv", truncation=SessionTruncation(reply_chars=5)
    )
    expected = tokenizer().apply_chat_template(
        [{"role": r, "content": c} for r, c in (*HISTORY, ("assistant", heard), *QUESTION)],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer().decode(request.prompt_token_ids) == expected
    # What was heard is still reused; the cache stops where the history changed.
    assert 0 < started.cached_prompt_tokens < len(request.prompt_token_ids)


async def test_a_refused_turn_leaves_the_session_as_it_was(engine: Engine) -> None:
    _, _, reply, _, _ = await turn(engine, "r1", HISTORY, "kept")
    busy = engine.add_request(
        GenerationRequest(
            "r2",
            PromptInput(chat=QUESTION),
            stopping=StoppingParams(max_tokens=400, ignore_eos=True),
            session_id="kept",
        )
    )
    with pytest.raises(RequestError) as refused:  # the session is busy: this turn cannot run
        await engine.submit(
            GenerationRequest(
                "r3",
                PromptInput(chat=QUESTION),
                session_id="kept",
                truncation=SessionTruncation(reply_chars=0),
            )
        )
    assert refused.value.code is ErrorCode.FAILED_PRECONDITION
    engine.abort("r2", StopReason.CANCELLED)
    async for _ in busy:
        pass
    # The refused turn's truncation was not applied: the cancelled turn r2 kept nothing new (it was
    # cancelled in its prefill or with its reply), and r1's reply is still whole in the history.
    request, _, _, _, _ = await turn(engine, "r4", QUESTION, "kept")
    assert reply in tokenizer().decode(request.prompt_token_ids)


async def test_sessions_are_isolated_and_expire(engine: Engine) -> None:
    await turn(engine, "a1", HISTORY, "alice")
    _, started, _, _, _ = await turn(engine, "b1", QUESTION, "bob")
    assert started.cached_prompt_tokens == 0  # bob has no history: alice's cache is not his
    # The store's clock jumps past the TTL: every session has now been idle for longer than it.
    later = time.monotonic() + engine.sessions.ttl_s + 1
    engine.sessions.clock = lambda: later
    request, started, _, _, _ = await turn(engine, "a2", QUESTION, "alice")
    assert started.cached_prompt_tokens == 0  # expired: a full prefill of just this turn
    assert tokenizer().decode(request.prompt_token_ids).count("<|im_start|>user") == 1


async def test_lru_eviction_keeps_the_byte_budget(engine: Engine) -> None:
    for i in range(3):
        await turn(engine, f"s{i}", HISTORY, f"session-{i}")
    one = engine.sessions.nbytes // 3
    engine.sessions.max_bytes = 2 * one
    await turn(engine, "s3", HISTORY, "session-3")
    assert len(engine.sessions) == 2 and engine.sessions.nbytes <= 2 * one
    _, started, _, _, _ = await turn(engine, "again", QUESTION, "session-0")  # evicted first
    assert started.cached_prompt_tokens == 0

"""Automatic prefix caching over the real runner (tiny model): a request without a session reuses the
KV of an earlier or running request's prefix, computes a shared prefix once, stays within its byte
budget, never crosses principals, and never changes the output."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.models import runner_and_reference, tiny_model
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    Delta,
    Finished,
    GenerationRequest,
    PromptInput,
    SamplingParams,
    Started,
    StoppingParams,
)

SYSTEM = tuple(range(1000, 1200))  # a 200-token "system prompt"


def request(
    request_id: str, ids: tuple[int, ...], owner: str = "", seed: int | None = None
) -> GenerationRequest:
    sampling = (
        SamplingParams(temperature=0.8, seed=seed) if seed is not None else SamplingParams(temperature=0.0)
    )
    return GenerationRequest(
        request_id,
        PromptInput(token_ids=ids),
        sampling=sampling,
        stopping=StoppingParams(max_tokens=12, ignore_eos=True),
        owner=owner,
    )


async def run(engine: Engine, req: GenerationRequest) -> tuple[Started, list[int], Finished]:
    return await collect(await engine.submit(req))


async def collect(stream: AsyncIterator[object]) -> tuple[Started, list[int], Finished]:
    started, tokens, finished = None, [], None
    async for item in stream:
        if isinstance(item, Started):
            started = item
        elif isinstance(item, Delta):
            tokens.extend(item.token_ids)
        elif isinstance(item, Finished):
            finished = item
    assert started is not None and finished is not None
    return started, tokens, finished


class CountingPrefill:
    """Counts the prompt tokens the runner prefills."""

    def __init__(self, engine: Engine) -> None:
        self.tokens = 0
        self._prefill = engine.runner.prefill
        engine.runner.prefill = self  # type: ignore[method-assign]

    def __call__(self, chunks):  # type: ignore[no-untyped-def]
        self.tokens += sum(len(c.token_ids) for c in chunks)
        return self._prefill(chunks)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    runner, _ = runner_and_reference(tiny_model())
    eng = Engine(runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=64))
    eng.start()
    yield eng
    await eng.stop()


@pytest.fixture
async def uncached() -> AsyncIterator[Engine]:
    """The same model with no prefix kept: the reference output."""
    runner, _ = runner_and_reference(tiny_model())
    eng = Engine(runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=64, saved_kv_bytes=0))
    eng.start()
    yield eng
    await eng.stop()


async def test_a_resent_conversation_reuses_its_prefix_and_the_output_is_the_same(
    engine: Engine, uncached: Engine
) -> None:
    first_prompt = (*SYSTEM, 5, 6, 7)
    _, reply, _ = await run(engine, request("t1", first_prompt, seed=3))  # sampled: varied tokens
    assert len(reply) == 12
    resent = (*first_prompt, *reply, 8, 9, 10)  # the client's history, plus a new message
    counting = CountingPrefill(engine)
    started, tokens, finished = await run(engine, request("t2", resent))
    # Everything up to the reply's last token was kept (that token's KV was never computed).
    assert started.cached_prompt_tokens == len(first_prompt) + len(reply) - 1
    assert finished.usage.cached_prompt_tokens == started.cached_prompt_tokens
    assert counting.tokens == len(resent) - started.cached_prompt_tokens
    _, expected, _ = await run(uncached, request("t2", resent))
    assert tokens == expected
    # Seeded sampling too: a hit changes nothing but the time.
    _, sampled, _ = await run(engine, request("s1", resent, seed=7))
    _, expected_sampled, _ = await run(uncached, request("s1", resent, seed=7))
    assert sampled == expected_sampled
    assert engine.prefixes.hits >= 2 and engine.prefix_cache_bytes > 0


async def test_a_prefix_is_never_reused_across_principals(engine: Engine) -> None:
    await run(engine, request("a", (*SYSTEM, 1), owner="alice"))
    started, _, _ = await run(engine, request("m", (*SYSTEM, 2), owner="mallory"))
    assert started.cached_prompt_tokens == 0  # a faster first token would tell mallory what alice sent
    started, _, _ = await run(engine, request("a2", (*SYSTEM, 3), owner="alice"))
    assert started.cached_prompt_tokens >= len(SYSTEM)


async def test_requests_arriving_together_prefill_a_shared_prefix_once(
    engine: Engine, uncached: Engine
) -> None:
    counting = CountingPrefill(engine)
    prompts = [(*SYSTEM, 100 + i, 200 + i) for i in range(4)]
    streams = [await engine.submit(request(f"b{i}", p)) for i, p in enumerate(prompts)]
    results = [await collect(stream) for stream in streams]
    # One request computed the 200 shared tokens; the other three copied them.
    assert counting.tokens == len(SYSTEM) + 4 * 2, counting.tokens
    assert sorted(r[0].cached_prompt_tokens for r in results) == [0, len(SYSTEM), len(SYSTEM), len(SYSTEM)]
    for i, prompt in enumerate(prompts):
        _, expected, _ = await run(uncached, request(f"b{i}", prompt))
        assert results[i][1] == expected, i


async def test_the_cache_stays_within_its_budget_and_sessions_come_first() -> None:
    runner, _ = runner_and_reference(tiny_model())
    engine = Engine(
        runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=64, saved_kv_bytes=200_000)
    )
    engine.start()
    try:
        for i in range(12):
            await run(engine, request(f"p{i}", (*range(2000 + 100 * i, 2100 + 100 * i),)))
            assert engine.prefix_cache_bytes + engine.session_cache_bytes <= 200_000
        assert 0 < len(engine.prefixes) < 12  # the oldest went first
        # The most recent one is still there.
        started, _, _ = await run(engine, request("again", (*range(3100, 3200), 1)))
        assert started.cached_prompt_tokens >= 99
    finally:
        await engine.stop()

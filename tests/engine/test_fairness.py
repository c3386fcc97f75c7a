"""Fair shares between principals (owners): a greedy owner's queue or long prompt does not hold back
another owner's request by more than a few steps; each owner's own requests keep their order."""

from __future__ import annotations

import asyncio
import itertools
import threading

from tests.fake_runner import FakeRunner, token_id
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.requests import (
    Delta,
    ErrorCode,
    GenerationRequest,
    PromptInput,
    RequestError,
    StoppingParams,
)
from tokenwire.service.engine.scheduler import PrefillSlice, ScheduledSequence, Scheduler, SchedulerConfig

HELLO = token_id("Ġhello")


def test_rows_go_to_owners_in_turn_oldest_first_within_each() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=1, prefill_tokens_per_step=8))
    for seq_id in range(5):
        s.add(ScheduledSequence(seq_id, 2, "greedy"))
    s.add(ScheduledSequence(10, 2, "other"))
    s.add(ScheduledSequence(11, 2, "other"))
    order = []
    while s.num_waiting:
        (admitted,) = s.admit()
        order.append(admitted)
        s.remove(admitted)  # its row frees up
    assert order == [0, 10, 1, 11, 2, 3, 4]


def test_owners_take_turns_at_the_front_of_the_prefill_budget() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, prefill_tokens_per_step=8))
    s.add(ScheduledSequence(0, 1000, "greedy"))  # a long prompt, first in line
    s.add(ScheduledSequence(1, 12, "other"))
    s.admit()
    plans = []
    for _ in range(3):
        plan = s.plan()
        s.complete_prefill(plan)
        plans.append(plan.prefill)
    # FIFO would give the long prompt all 8 tokens of every step until its 1000 were done.
    assert plans == [
        [PrefillSlice(1, 0, 8, False)],
        [PrefillSlice(0, 0, 8, False)],
        [PrefillSlice(1, 8, 12, True), PrefillSlice(0, 8, 12, False)],
    ]


def request(request_id: str, owner: str, max_tokens: int, prompt_len: int = 1) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        PromptInput(token_ids=(HELLO,) * prompt_len),
        stopping=StoppingParams(max_tokens=max_tokens),
        owner=owner,
    )


async def steps_to_first_token(engine: Engine, victim: GenerationRequest) -> int:
    """Engine steps from the victim's submission to its first token."""
    steps = itertools.count()
    counted = [0]
    lock = threading.Lock()

    def on_step(_seconds: float, _batch: int) -> None:
        with lock:
            counted[0] = next(steps)

    engine.on_step = on_step
    with lock:
        submitted_at = counted[0]
    stream = await engine.submit(victim)
    async for item in stream:
        if isinstance(item, Delta):
            with lock:
                return counted[0] - submitted_at
    raise AssertionError("the victim produced no token")


async def test_a_greedy_principal_with_200_queued_does_not_delay_another() -> None:
    batch, max_tokens = 4, 8
    runner = FakeRunner(max_batch_size=batch, context_length=256, step_delay=0.001)
    config = EngineConfig(max_batch_size=batch, prefill_tokens_per_step=64, max_live_requests=256)
    engine = Engine(runner, config)
    engine.start()
    try:
        greedy = [await engine.submit(request(f"g{i}", "greedy", max_tokens)) for i in range(200)]
        assert engine.num_waiting > 150  # a long queue, FIFO would serve it first
        steps = await steps_to_first_token(engine, request("v", "victim", 4))
        # The next row that frees up is the victim's: at most one greedy request's tokens, then its
        # prefill. In FIFO order it would wait for ~200 / 4 * 8 = 400 steps.
        assert steps <= max_tokens + 2, steps
        assert not any(stream.done for stream in greedy[100:])  # they wait on: fair, not preempted
    finally:  # stop() ends every live request
        await engine.stop()


async def test_a_greedy_principals_long_prompt_does_not_hold_back_a_short_one() -> None:
    runner = FakeRunner(max_batch_size=4, context_length=4096, step_delay=0.001)
    engine = Engine(runner, EngineConfig(max_batch_size=4, prefill_tokens_per_step=16, max_live_requests=16))
    engine.start()
    try:
        long = await engine.submit(request("long", "greedy", 4, prompt_len=4000))  # 250 steps of prefill
        await asyncio.sleep(0.02)
        steps = await steps_to_first_token(engine, request("v", "victim", 4, prompt_len=30))
        assert steps <= 6, steps  # its two 16-token chunks, in alternate steps
        assert not long.done
    finally:
        await engine.stop()


async def test_a_named_principal_has_its_share_of_live_requests() -> None:
    runner = FakeRunner(max_batch_size=2, context_length=4096, step_delay=0.001)
    config = EngineConfig(max_batch_size=2, max_live_requests=8, max_live_requests_per_owner=3)
    engine = Engine(runner, config)
    engine.start()
    try:
        for i in range(3):
            await engine.submit(request(f"g{i}", "greedy", 4000))
        try:
            await engine.submit(request("g3", "greedy", 4000))
        except RequestError as error:
            assert error.code is ErrorCode.RESOURCE_EXHAUSTED
            assert "the most one caller may have at once" in error.message
        else:
            raise AssertionError("a fourth live request was taken")
        await engine.submit(request("v", "victim", 4))  # another principal still gets in
        # The anonymous principal (no auth) has only the server-wide limit.
        for i in range(4):
            await engine.submit(request(f"a{i}", "", 4000))
    finally:
        await engine.stop()

"""The scheduler alone: FIFO admission by rows, chunked prefill under a token budget, removal in any phase."""

from __future__ import annotations

import itertools
import sys

from tokenwire.service.engine.scheduler import (
    Phase,
    PrefillSlice,
    ScheduledSequence,
    Scheduler,
    SchedulerConfig,
)


def scheduler(rows: int = 2, budget: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size=rows, prefill_tokens_per_step=budget))


def step(s: Scheduler) -> tuple[list[int], list[PrefillSlice], list[int]]:
    admitted = s.admit()
    plan = s.plan()
    s.complete_prefill(plan)
    return admitted, plan.prefill, plan.decode


def test_no_torch() -> None:
    assert "torch" not in sys.modules or "tokenwire.service.model.runner" in sys.modules


def test_fifo_admission_by_rows() -> None:
    s = scheduler(rows=2)
    for i, n in enumerate([3, 3, 3]):
        s.add(ScheduledSequence(i, n))
    assert step(s) == ([0, 1], [PrefillSlice(0, 0, 3, True), PrefillSlice(1, 0, 3, True)], [0, 1])
    assert s.num_waiting == 1 and s.num_decoding == 2
    # Nothing is admitted until a row frees up; then the oldest waiter goes first.
    assert step(s) == ([], [], [0, 1])
    assert s.remove(0) is Phase.DECODE
    assert step(s) == ([2], [PrefillSlice(2, 0, 3, True)], [1, 2])


def test_long_prompt_is_chunked_within_the_budget_and_shares_it_oldest_first() -> None:
    s = scheduler(rows=3, budget=8)
    s.add(ScheduledSequence(0, 20))
    s.add(ScheduledSequence(1, 4))
    assert step(s) == ([0, 1], [PrefillSlice(0, 0, 8, False)], [])
    assert step(s) == ([], [PrefillSlice(0, 8, 16, False)], [])
    assert step(s) == ([], [PrefillSlice(0, 16, 20, True), PrefillSlice(1, 0, 4, True)], [0, 1])


def test_reused_prefix_is_not_prefilled_again() -> None:
    s = scheduler()
    s.add(ScheduledSequence(0, 100))
    assert s.admit() == [0]
    s.restart_prefill_at(0, 97)  # a session held the first 97 tokens
    plan = s.plan()
    assert plan.prefill == [PrefillSlice(0, 97, 100, True)]


def test_remove_in_every_phase_leaves_nothing() -> None:
    s = scheduler(rows=2, budget=4)
    s.add(ScheduledSequence(0, 2))
    s.add(ScheduledSequence(1, 10))
    s.add(ScheduledSequence(2, 2))
    step(s)
    assert [s.get(i).phase for i in range(3)] == [Phase.DECODE, Phase.PREFILL, Phase.WAITING]  # type: ignore[union-attr]
    assert [s.remove(i) for i in (2, 1, 0)] == [Phase.WAITING, Phase.PREFILL, Phase.DECODE]
    assert s.remove(0) is None
    assert len(s) == 0 and not s.has_work() and s.num_running == 0 and s.num_waiting == 0
    assert step(s) == ([], [], [])


def test_with_an_attention_span_deep_prompt_tokens_take_more_of_the_budget() -> None:
    """A token at position p costs 1 + p / span: chunks shrink as a prompt deepens, so no step's
    prefill (matmuls plus attention over everything before) runs much longer than another's."""
    span, budget = 640, 256
    s = Scheduler(
        SchedulerConfig(max_batch_size=2, prefill_tokens_per_step=budget, prefill_attention_span=span)
    )
    s.add(ScheduledSequence(0, 3000))
    chunks = []
    while s.num_decoding == 0:
        _, prefill, _ = step(s)
        (piece,) = prefill
        chunks.append(piece)
    assert chunks[0].start == 0 and chunks[-1].end == 3000 and chunks[-1].last
    assert all(a.end == b.start for a, b in itertools.pairwise(chunks))  # contiguous, nothing twice
    sizes = [c.end - c.start for c in chunks]
    assert sizes[0] < budget and sizes == sorted(sizes, reverse=True) and sizes[-2] < 80
    for c in chunks:
        cost = sum(1 + p / span for p in range(c.start, c.end))
        assert cost <= budget + 1e-9  # and the most that fits:
        assert c.last or cost + 1 + c.end / span > budget


def test_a_token_deeper_than_the_whole_budget_still_progresses_and_the_rest_shares_what_is_left() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2, prefill_tokens_per_step=8, prefill_attention_span=1))
    s.add(ScheduledSequence(0, 103))
    s.add(ScheduledSequence(1, 3))
    s.admit()
    s.restart_prefill_at(0, 100)  # each remaining token costs ~101 budget tokens
    _, prefill, _ = step(s)
    assert prefill == [PrefillSlice(0, 100, 101, False)]  # one token: progress; nothing left for 1
    s2 = Scheduler(SchedulerConfig(max_batch_size=2, prefill_tokens_per_step=8, prefill_attention_span=4))
    s2.add(ScheduledSequence(0, 2))
    s2.add(ScheduledSequence(1, 10))
    # 0 costs 1 + 1.25 = 2.25; then 1 gets what fits in 5.75: tokens at 0, 1, 2, 3 cost 1, 1.25, 1.5, 1.75
    assert step(s2)[1] == [PrefillSlice(0, 0, 2, True), PrefillSlice(1, 0, 4, False)]

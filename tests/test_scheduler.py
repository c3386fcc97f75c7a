"""The scheduler alone: FIFO admission by rows, chunked prefill under a token budget, removal in any phase."""

from __future__ import annotations

import sys

from tokenwire.service.scheduler import Phase, PrefillSlice, ScheduledSequence, Scheduler, SchedulerConfig


def scheduler(rows: int = 2, budget: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_batch_size=rows, prefill_tokens_per_step=budget))


def step(s: Scheduler) -> tuple[list[int], list[PrefillSlice], list[int]]:
    admitted = s.admit()
    plan = s.plan()
    s.complete_prefill(plan)
    return admitted, plan.prefill, plan.decode


def test_no_torch() -> None:
    assert "torch" not in sys.modules or "tokenwire.service.model_runner" in sys.modules


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

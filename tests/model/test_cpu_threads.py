"""The thread governor: fewer model threads while other processes hold cores, all of them otherwise."""

from __future__ import annotations

import pytest

from tokenwire.service.model import cpu_threads
from tokenwire.service.model.cpu_threads import ThreadGovernor


class FakeProc:
    """Plays /proc: total busy ticks and this process's ticks, advanced by hand."""

    def __init__(self) -> None:
        self.total = 0
        self.own = 0

    def run(self, seconds: float, *, own_cores: float, other_cores: float) -> None:
        ticks = cpu_threads._CLOCK_TICKS * seconds
        self.own += round(own_cores * ticks)
        self.total += round((own_cores + other_cores) * ticks)

    def sample(self) -> tuple[int, int]:
        return self.total, self.own


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeProc, list[float], list[int]]:
    proc, clock, calls = FakeProc(), [100.0], []
    monkeypatch.setattr(cpu_threads, "_sample", proc.sample)
    monkeypatch.setattr(cpu_threads.time, "monotonic", lambda: clock[0])
    return proc, clock, calls


def step(governor: ThreadGovernor, proc: FakeProc, clock: list[float], **load: float) -> None:
    proc.run(1.0, own_cores=load.get("own", 2.0), other_cores=load.get("others", 0.0))
    clock[0] += 1.0
    governor.tick()


def test_threads_follow_the_cores_other_processes_hold(world) -> None:
    proc, clock, calls = world
    governor = ThreadGovernor(calls.append, cores=2)
    step(governor, proc, clock, own=2.0, others=0.2)  # a light neighbour (a local client): keep both
    assert governor.threads == 2 and calls == []
    step(governor, proc, clock, own=1.0, others=1.0)  # a busy neighbour holds a core
    assert governor.threads == 1 and calls == [1]
    step(governor, proc, clock, own=1.0, others=1.0)
    assert calls == [1]  # only changes are applied
    step(governor, proc, clock, own=2.0, others=0.0)  # it left
    assert governor.threads == 2 and calls == [1, 2]
    step(governor, proc, clock, own=0.5, others=3.0)  # never fewer than one
    assert governor.threads == 1


def test_a_load_near_the_line_does_not_flip_the_count(world) -> None:
    proc, clock, calls = world
    governor = ThreadGovernor(calls.append, cores=2)
    step(governor, proc, clock, own=2.0, others=0.4)  # below the line: both threads
    assert governor.threads == 2
    step(governor, proc, clock, own=1.0, others=0.6)  # above: one
    step(governor, proc, clock, own=1.0, others=0.4)  # not clearly free yet: still one
    assert governor.threads == 1 and calls == [1]
    step(governor, proc, clock, own=2.0, others=0.2)
    assert governor.threads == 2 and calls == [1, 2]


def test_four_cores_count_each_held_core(world) -> None:
    proc, clock, calls = world
    governor = ThreadGovernor(calls.append, cores=4)
    step(governor, proc, clock, own=2.0, others=1.7)
    assert governor.threads == 2
    step(governor, proc, clock, own=3.0, others=0.9)
    assert governor.threads == 3
    step(governor, proc, clock, own=1.0, others=9.0)
    assert governor.threads == 1


def test_checks_at_most_once_an_interval(world) -> None:
    proc, clock, calls = world
    governor = ThreadGovernor(calls.append, cores=2, interval_s=1.0)
    proc.run(0.5, own_cores=1.0, other_cores=1.0)
    clock[0] += 0.5
    governor.tick()
    assert calls == []


def test_no_proc_no_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_threads, "_sample", lambda: None)
    calls: list[int] = []
    governor = ThreadGovernor(calls.append, cores=2, interval_s=0.0)
    governor.tick()
    assert governor.threads == 2 and calls == []


def test_reads_this_machine() -> None:
    sample = cpu_threads._sample()
    if sample is None:
        pytest.skip("no /proc, or it counts CPUs this process cannot use")
    total, own = sample
    assert total >= own >= 0

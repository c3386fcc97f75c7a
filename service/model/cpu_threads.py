"""How many cores the model's step may use: all of them, unless other processes are busy on them.

OpenMP threads wait for each other at the end of every parallel kernel, a few hundred times a
decode step. Spinning there is what makes a quiet 2-core machine fast (16 rows: ~62 ms a step
spinning, ~100 ms with sleeping waits), but when another process holds a core, a spinning thread
burns the time slice the thread with the work needs: 16 rows went to ~250-370 ms a step, one row
from ~19 ms to ~240 ms. One thread has nothing to wait for. So the step runs on every core while
the others are idle, and on one fewer for each core that other processes keep busy.

Measured from /proc (Linux): all CPU time minus this process's, over the last interval.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("tokenwire.model")

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ThreadGovernor:
    """Call `tick()` from the thread that runs the model, once per step; it is cheap between checks."""

    def __init__(
        self,
        set_threads: Callable[[int], None],
        cores: int,
        *,
        interval_s: float = 1.0,
        busy_core: float = 0.5,
        margin: float = 0.2,
    ) -> None:
        self._set_threads = set_threads
        self._cores = cores
        self._interval = interval_s
        # Other processes using this much of a core hold it; it is free again only below
        # busy_core - margin, so a load near the line does not flip the count every second.
        self._busy_core = busy_core
        self._margin = margin
        self.threads = cores
        self._last = _sample()
        self._last_at = time.monotonic()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_at < self._interval or self._last is None:
            return
        sample = _sample()
        if sample is None:
            return
        elapsed = now - self._last_at
        others = ((sample[0] - self._last[0]) - (sample[1] - self._last[1])) / _CLOCK_TICKS / elapsed
        self._last, self._last_at = sample, now
        held = self._cores - self.threads  # cores counted as held by others now
        while held < self._cores - 1 and others > held + self._busy_core:
            held += 1
        while held > 0 and others < held - 1 + self._busy_core - self._margin:
            held -= 1
        threads = self._cores - held
        if threads != self.threads:
            # "of N cores": the count reads right as 1 too (this runs only with 2 cores or more).
            log.info(
                "other processes use %.1f cores: the model now runs on %d of %d cores",
                others,
                threads,
                self._cores,
            )
            self._set_threads(threads)
            self.threads = threads


def _sample() -> tuple[int, int] | None:
    """(busy ticks of every CPU, ticks of this process), or None where /proc is missing or counts
    CPUs this process cannot run on (a container on a larger host sees the host's load)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        if cpus != len(os.sched_getaffinity(0)):
            return None
    except (OSError, AttributeError):
        return None
    fields = lines[0].split()[1:]
    values = [int(v) for v in fields]
    busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # minus idle and iowait
    return busy, int(own[11]) + int(own[12])  # utime + stime

"""Waiting for a condition that no event announces (another thread's or process's state): poll it,
with a deadline, and fail saying what never happened. Prefer an event, a future or the stream itself
when there is one; this is for the rest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_S = 0.005


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """Block until `predicate()` is true; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout} s")
        time.sleep(POLL_S)


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition") -> None:
    """`wait_until` for a coroutine: the event loop runs on while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still not true after {timeout} s")
        await asyncio.sleep(POLL_S)

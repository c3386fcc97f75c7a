"""Servers for the reliability suite: in-process with a wide fake batch, on a background loop, or a child."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import running_server
from tests.fake_runner import FakeRunner
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.transport.server import RunningServer

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]

# Wide enough that 200 streams x 2 requests all fit as live requests, and batches of 16 like production.
LOAD_ENGINE = EngineConfig(max_batch_size=16, prefill_tokens_per_step=256, max_live_requests=1024)


def fake_server(
    engine_config: EngineConfig = LOAD_ENGINE, *, context_length: int = 1024, **options: Any
) -> contextlib.AbstractAsyncContextManager[RunningServer]:
    """tests.conftest.running_server with production-sized batches and a longer context."""
    return running_server(engine_config, context_length=context_length, **options)


def engine_of(server: RunningServer) -> Engine:
    assert server.engine is not None
    return server.engine


def fake_of(server: RunningServer) -> FakeRunner:
    runner = engine_of(server).runner
    assert isinstance(runner, FakeRunner)
    return runner


# ---- a server on its own event loop, for synchronous (hypothesis) tests ----


class BackgroundServer:
    """A fake-runner server on an event loop in a daemon thread. `run(coro)` runs client code on that
    same loop, so hypothesis (synchronous) can drive grpc.aio clients while the server keeps serving."""

    def __init__(self, engine_config: EngineConfig, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="reliability-loop", daemon=True)
        self._thread.start()
        self._context = fake_server(engine_config, **options)
        self.server: RunningServer = self.run(self._context.__aenter__())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def engine(self) -> Engine:
        return engine_of(self.server)

    def close(self) -> None:
        try:
            self.run(self._context.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


# The fuzz server: a short context so that generations left without max_tokens end quickly, a step just
# long enough that an Interrupt sent right behind its Start finds it running, and a message limit small
# enough that oversize cases stay cheap to build and send.
FUZZ_ENGINE = EngineConfig(max_batch_size=8, prefill_tokens_per_step=64, max_live_requests=64)
FUZZ_CONTEXT = 32
FUZZ_MESSAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[BackgroundServer]:
    server = BackgroundServer(
        FUZZ_ENGINE, step_delay=0.0003, context_length=FUZZ_CONTEXT, max_message_bytes=FUZZ_MESSAGE_BYTES
    )
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cancel_server() -> Iterator[BackgroundServer]:
    """A long context, so that the generation a Cancel case aims at is surely still running."""
    server = BackgroundServer(
        FUZZ_ENGINE, step_delay=0.001, context_length=4096, max_message_bytes=FUZZ_MESSAGE_BYTES
    )
    try:
        yield server
    finally:
        server.close()


# ---- leak checks ----


class Leaks:
    """Tasks and threads alive now, to compare with after some work (`check`)."""

    # grpc.aio's server keeps a task per registered method waiting for the next call; which of them
    # is alive changes with every call, so a couple of new ones are not a leak.
    GRPC_ACCEPT = "_request_registered_call"
    GRPC_TOLERANCE = 4

    def __init__(self) -> None:
        self.tasks = set(asyncio.all_tasks())
        self.threads = set(threading.enumerate())

    async def check(self, settle_s: float = 0.5) -> tuple[int, int]:
        """Assert nothing leaked after letting finished work unwind; returns (tasks, threads) new."""
        await asyncio.sleep(settle_s)
        new = [t for t in asyncio.all_tasks() - self.tasks if t is not asyncio.current_task()]
        grpc_accept = [t for t in new if self.GRPC_ACCEPT in repr(t)]
        ours = [t for t in new if t not in grpc_accept]
        assert not ours, f"{len(ours)} tasks leaked: {[repr(t)[:200] for t in ours[:5]]}"
        assert len(grpc_accept) <= self.GRPC_TOLERANCE, f"{len(grpc_accept)} grpc accept tasks"
        threads = set(threading.enumerate()) - self.threads
        assert not threads, f"threads leaked: {[t.name for t in threads]}"
        return len(new), len(threads)


# ---- subprocesses ----


def python_env() -> dict[str, str]:
    """The environment for child Pythons: this checkout importable as `tests`, no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """`python -m tests.reliability.server_main` in a child process; `.pid` for RSS, `.address` to dial."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.server_main", *args],
            cwd=ROOT,
            env=python_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # "PORT <n>", printed once serving
        assert line.startswith("PORT "), f"server did not start: {line!r}"
        self.address = f"127.0.0.1:{int(line.split()[1])}"
        self.pid = self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

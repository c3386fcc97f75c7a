"""A tokenwire server over the fake runner in its own process (so its RSS is its own); prints "PORT <n>"."""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal

from tests.fake_runner import FakeRunner
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.transport.server import ServerConfig, serve


async def main(args: argparse.Namespace) -> None:
    runner = FakeRunner(max_batch_size=args.batch, context_length=args.context, step_delay=args.step_delay)
    # FakeRunner records every forward for assertions; over thousands of steps that list alone would
    # look like a leak, so keep only the last few.
    runner.calls = collections.deque(maxlen=16)  # type: ignore[assignment]
    engine = Engine(runner, EngineConfig(max_batch_size=args.batch, max_live_requests=256))
    engine.start()
    config = ServerConfig(
        host=args.host,
        port=args.port,
        grace_period_s=0.0,
        replica_id=args.replica_id,
        heartbeat_interval_s=args.heartbeat_interval,
    )
    server = await serve(engine, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"PORT {server.port}", flush=True)
    watch = asyncio.create_task(_orphaned(stop))
    await stop.wait()
    watch.cancel()
    await server.stop(0)


async def _orphaned(stop: asyncio.Event) -> None:
    """Stop when the process that started this one is gone (a test run killed before its clean-up)."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    stop.set()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--step-delay", type=float, default=0.001)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--replica-id", default="")
    parser.add_argument("--heartbeat-interval", type=float, default=ServerConfig.heartbeat_interval_s)
    asyncio.run(main(parser.parse_args()))

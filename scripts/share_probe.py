"""Safe-to-share figures for a server with the default model: fairness between principals, the stall a
huge input causes to everyone else, and the memory left by abandoned streams.

    .venv/bin/python scripts/share_probe.py            # starts its own server (default model)

1. Fairness: a greedy principal queues 200 requests on one stream; then a second principal's request
   is timed to its first token, and compared with the same request sent as the greedy principal (the
   order a FIFO server would give everyone).
2. Stall: while another principal streams, a 3.9 MB prompt, a prompt at --max-prompt-chars
   (1,000,000 characters: tokenized, then refused for the context length) and a chat at
   --max-chat-messages are sent. Reported: the other stream's longest gap between chunks and the
   slowest health check (polled every 20 ms), against the same figures with no huge input.
3. Abandonment: 300 streams each start a generation, then their connections vanish; three rounds.
   Reported: server RSS before, after each round once idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import progress, rss_mb, started_server

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

WATCHERS = itertools.count()
GREEDY, VICTIM = "greedy-token-000000001", "victim-token-000000002"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def start(request_id: str, prompt: str, max_tokens: int) -> pb.GenerateRequest:
    stopping = pb.StoppingParams(max_tokens=max_tokens, ignore_eos=True)  # exactly max_tokens
    return pb.GenerateRequest(start=pb.Start(request_id=request_id, prompt=prompt, stopping=stopping))


async def first_token_s(stub: pb_grpc.TokenWireStub, token: str, request_id: str) -> float:
    call = stub.Generate(metadata=bearer(token))
    began = time.monotonic()
    await call.write(start(request_id, "The weather today is", 4))
    await call.done_writing()
    async for response in call:
        if response.request_id == request_id and response.WhichOneof("kind") == "chunk":
            elapsed = time.monotonic() - began
            call.cancel()
            return elapsed
    raise AssertionError(f"{request_id}: no token")


async def fairness(address: str) -> dict[str, float]:
    results: dict[str, list[float]] = {"another principal": [], "the greedy principal itself": []}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.TokenWireStub(channel)
        for round_ in range(3):
            for who, token in (("another principal", VICTIM), ("the greedy principal itself", GREEDY)):
                greedy = stub.Generate(metadata=bearer(GREEDY))
                for i in range(200):
                    await greedy.write(start(f"g{round_}-{who[0]}-{i}", "Tell me a long story.", 24))
                await asyncio.sleep(1.0)  # the queue is there, the batch full
                results[who].append(await first_token_s(stub, token, f"v{round_}-{who[0]}"))
                greedy.cancel()
                await asyncio.sleep(1.0)
    return {who: statistics.median(times) for who, times in results.items()}


@contextlib.asynccontextmanager
async def watched(address: str) -> AsyncIterator[dict[str, float]]:
    """Another principal's stream and a health poller run while the body runs; yields their worst."""
    worst = {"chunk_gap_s": 0.0, "health_s": 0.0}
    seen: dict[str, float] = {}  # when the last chunk came
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as channel:
        stub, health = pb_grpc.TokenWireStub(channel), health_pb2_grpc.HealthStub(channel)

        async def stream() -> None:
            call = stub.Generate(metadata=bearer(VICTIM))
            await call.write(start(f"watcher-{next(WATCHERS)}", "Tell me a long story about the sea.", 5000))
            async for response in call:
                now = time.monotonic()
                kind = response.WhichOneof("kind")
                assert kind in ("started", "chunk", "heartbeat"), response  # streaming all along
                if kind == "chunk":
                    if "last" in seen:
                        worst["chunk_gap_s"] = max(worst["chunk_gap_s"], now - seen["last"])
                    seen["last"] = now
                if stop.is_set():
                    call.cancel()
                    return

        async def poll() -> None:
            while not stop.is_set():
                began = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                worst["health_s"] = max(worst["health_s"], time.monotonic() - began)
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(stream()), asyncio.create_task(poll())]
        await asyncio.sleep(1.0)  # streaming
        worst["chunk_gap_s"] = worst["health_s"] = 0.0
        try:
            yield worst
        finally:
            await asyncio.sleep(0.5)
            # A stream stalled until now has not had its gap measured by a chunk yet.
            worst["chunk_gap_s"] = max(worst["chunk_gap_s"], time.monotonic() - seen.get("last", 0.0))
            stop.set()
            await asyncio.wait(tasks, timeout=30)


async def stalls(address: str) -> dict[str, dict[str, float | str]]:
    huge_inputs: dict[str, pb.GenerateRequest | None] = {
        "nothing (baseline)": None,
        "3.9 MB prompt": start("huge", "word " * 780_000, 8),
        "1,000,000-character prompt": start("limit", "word " * 200_000, 8),
        "1,000-message chat": pb.GenerateRequest(
            start=pb.Start(
                request_id="chat",
                chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hello " * 150)] * 1000),
            )
        ),
    }
    figures: dict[str, dict[str, float | str]] = {}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        stub = pb_grpc.TokenWireStub(ch)
        for name, request in huge_inputs.items():
            async with watched(address) as worst:
                answer = "-"
                began = time.monotonic()
                if request is not None:
                    call = stub.Generate(metadata=bearer(GREEDY))
                    await call.write(request)
                    await call.done_writing()
                    async for response in call:
                        kind = response.WhichOneof("kind")
                        if kind == "error":
                            answer = f"Error {response.error.code}: {response.error.message[:70]}"
                        elif kind == "finished":
                            answer = "ran"
                    answer = f"{answer} after {time.monotonic() - began:.2f} s"
                await asyncio.sleep(0.5)
            figures[name] = {**worst, "answer": answer}
            progress(f"stall with {name}: {figures[name]}")
    return figures


async def abandonment(address: str, pid: int) -> list[float | None]:
    sizes = [rss_mb(pid)]
    for round_ in range(3):
        channels = [grpc.aio.insecure_channel(address) for _ in range(300)]
        calls = []
        for i, channel in enumerate(channels):
            call = pb_grpc.TokenWireStub(channel).Generate(metadata=bearer(VICTIM if i % 2 else GREEDY))
            await call.write(start(f"a{round_}-{i}", "Tell me a story.", 64))
            calls.append(call)
        await asyncio.sleep(2.0)
        for channel in channels:  # gone without a word: no half-close, no cancel
            await channel.close(grace=None)
        await asyncio.sleep(5.0)
        sizes.append(rss_mb(pid))
        progress(f"abandonment round {round_ + 1}: RSS {sizes[-1]:.0f} MB")
    return sizes


async def measure(address: str, pid: int) -> None:
    progress("fairness")
    fair = await fairness(address)
    for who, seconds in fair.items():
        print(f"fairness: first token for {who} behind 200 queued greedy requests: {seconds * 1000:.0f} ms")
    progress("stalls")
    for name, worst in (await stalls(address)).items():
        print(
            f"stall with {name}: other stream's longest chunk gap {worst['chunk_gap_s'] * 1000:.0f} ms, "
            f"slowest health check {worst['health_s'] * 1000:.0f} ms; answer: {worst['answer']}"
        )
    progress("abandonment")
    sizes = await abandonment(address, pid)
    before, *after = (f"{size:.0f}" for size in sizes if size)
    print(
        f"abandonment RSS (MB): {before} before; after each round of 300 vanished streams: {', '.join(after)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server-args", default="", help="extra tokenwire-server flags")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tokens = Path(folder) / "tokens"
        tokens.write_text(f"greedy {GREEDY}\nvictim {VICTIM}\n")
        extra = ["--auth-tokens-file", str(tokens), "--max-live-requests-per-principal", "0"]
        with started_server([*extra, *args.server_args.split()], Path("bench-out/share_probe.log")) as (
            address,
            pid,
        ):
            asyncio.run(measure(address, pid))


if __name__ == "__main__":
    main()

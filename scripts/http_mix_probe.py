"""HTTP beside gRPC on one engine: 16 streams all over gRPC, against 8 over the OpenAI HTTP API and 8 over
gRPC, in the same run (the HTTP front shares the engine, so its requests batch with gRPC's).

    .venv/bin/python scripts/http_mix_probe.py     # starts its own server (default model, --http-port)

Each stream runs requests in turn (greedy, exactly 128 tokens: ignore_eos). The two setups alternate for
`--rounds` rounds; reported: output tokens/s of each round and the median of each setup, and TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PROMPTS, free_port, pct, progress, started_server

from tokenwire.client import AsyncClient

MAX_TOKENS = 128


async def over_grpc(client: AsyncClient, prompt: str) -> tuple[float, int]:
    began = time.perf_counter()
    first, tokens = 0.0, 0
    generation = client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, include_token_ids=True)
    async for chunk in generation:
        first = first or time.perf_counter() - began
        tokens += len(chunk.token_ids)
    return first, tokens


async def over_http(http: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    began = time.perf_counter()
    first, tokens = 0.0, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("choices") and event["choices"][0].get("text"):
                first = first or time.perf_counter() - began
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens


async def level(grpc_address: str, http_url: str, http_streams: int, streams: int, per_stream: int) -> dict:
    ttfts: list[float] = []
    tokens = 0
    async with AsyncClient(grpc_address) as client, httpx.AsyncClient(base_url=http_url, timeout=120) as http:

        async def stream(index: int) -> None:
            nonlocal tokens
            for i in range(per_stream):
                prompt = PROMPTS[(index + i) % len(PROMPTS)]
                if index < http_streams:
                    first, count = await over_http(http, prompt)
                else:
                    first, count = await over_grpc(client, prompt)
                ttfts.append(first * 1000)
                tokens += count

        began = time.perf_counter()
        await asyncio.gather(*(stream(i) for i in range(streams)))
        wall = time.perf_counter() - began
    return {"tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttfts, 50), "tokens": tokens}


async def measure(grpc_address: str, http_url: str, rounds: int) -> None:
    setups = {"16 over gRPC": 0, "8 over HTTP + 8 over gRPC": 8}
    results: dict[str, list[dict]] = {name: [] for name in setups}
    await level(grpc_address, http_url, 1, 2, 1)  # warm both paths
    for round_ in range(rounds):
        for name, http_streams in setups.items():
            result = await level(grpc_address, http_url, http_streams, 16, 4)
            results[name].append(result)
            progress(f"round {round_ + 1}, {name}: {result['tokens_per_s']:.1f} tokens/s")
    for name, runs in results.items():
        rates = ", ".join(f"{r['tokens_per_s']:.1f}" for r in runs)
        median = statistics.median(r["tokens_per_s"] for r in runs)
        ttft = statistics.median(r["ttft_p50_ms"] for r in runs)
        print(f"{name}: {median:.1f} tokens/s median (rounds: {rates}); TTFT p50 {ttft:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra tokenwire-server flags")
    args = parser.parse_args()
    http_port = free_port()
    extra = ["--http-port", str(http_port), *args.server_args.split()]
    with started_server(extra, Path("bench-out/http_mix_probe.log")) as (address, _pid):
        asyncio.run(measure(address, f"http://127.0.0.1:{http_port}", args.rounds))


if __name__ == "__main__":
    main()

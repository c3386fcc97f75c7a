"""llama.cpp's `llama-server` as `make bench`'s reference: starting it, and one streamed completion.

The bench drives it over its HTTP API (`POST /completion`, server-sent events) the way it drives
tokenwire over gRPC: the same prompts, greedy, a fixed number of tokens, and the time to first token
taken when the first token's event arrives. `make llama-server` builds the binary
(scripts/build_llama_server.sh).
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# The reference set-up: 2 threads (this machine's cores), 16 parallel slots sharing a context
# of 16,384 tokens (1,024 each: prompt plus 128 tokens fit).
DEFAULT_FLAGS = "-t 2 -np 16 -c 16384"


def version(binary: Path) -> str:
    """What `llama-server --version` says (e.g. "version: 1 (0c1e570)"), or "?"."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def started(
    binary: Path, gguf: Path, flags: str, log_path: Path, timeout_s: float = 300
) -> Iterator[tuple[str, int, float]]:
    """A llama-server subprocess serving `gguf`; yields (base URL, pid, seconds until /health said ok).
    Its output goes to `log_path`."""
    port = _free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), *shlex.split(flags)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at = time.monotonic()
    with log_path.open("w") as log:
        log.write(" ".join(shlex.quote(c) for c in command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                if proc.poll() is not None:
                    raise SystemExit(
                        f"llama-server exited with {proc.returncode} before ready: see {log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:  # 503 while loading
                        break
                if time.monotonic() - started_at > timeout_s:
                    raise SystemExit(f"llama-server not ready after {timeout_s:.0f} s: see {log_path}")
                time.sleep(0.2)
            yield url, proc.pid, time.monotonic() - started_at
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def completion(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int
) -> tuple[float, list[float], int]:
    """One streamed completion of exactly `max_tokens` tokens, greedy. Returns (start time, the arrival
    time of each event that carried tokens, tokens generated), times from time.perf_counter()."""
    body = {
        "prompt": prompt,
        "n_predict": max_tokens,
        "temperature": 0.0,  # llama.cpp keeps only the most likely token: greedy
        "top_k": 1,
        "ignore_eos": True,
        "stream": True,
        "return_tokens": True,
    }
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", f"{url}/completion", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise RuntimeError(f"llama-server: {event['error']}")
            count = len(event.get("tokens") or [])
            if count:
                arrivals.append(time.perf_counter())
                tokens += count
            if event.get("stop"):
                break
    return started, arrivals, tokens

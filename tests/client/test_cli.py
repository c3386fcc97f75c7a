"""The `tokenwire` CLI as a person and a script use it: in a pseudo-terminal (pexpect) and through pipes,
against a real server with a slowed-down fake model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pexpect
import pytest

from tests.conftest import FAKE_ENGINE, free_port, running_server
from tokenwire.service.transport.server import RunningServer

CLI = [sys.executable, "-m", "tokenwire.client.cli"]
STEP_S = 0.05  # one token per 50 ms: a 400-token generation would take 20 s, so it is always mid-way


@contextlib.contextmanager
def server_in_thread(**options: Any) -> Iterator[RunningServer]:
    """running_server on an event loop of its own, so that blocking tests (pexpect, subprocess) can
    drive the CLI while the server keeps serving."""
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[RunningServer] = concurrent.futures.Future()
    stop = threading.Event()

    async def run() -> None:
        async with running_server(FAKE_ENGINE, **options) as server:
            ready.set_result(server)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=10)
    finally:
        stop.set()
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with server_in_thread(step_delay=STEP_S, context_length=1024) as server:
        yield server


def wait_idle(server: RunningServer, timeout: float = 5.0) -> None:
    engine = server.engine
    assert engine is not None
    deadline = time.monotonic() + timeout
    while not engine.is_idle():
        assert time.monotonic() < deadline, f"{engine.num_live()} requests still live"
        time.sleep(0.02)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWIRE_")}
    return {**env, **extra}


def spawn(*args: str, **env: str) -> pexpect.spawn:
    return pexpect.spawn(
        CLI[0],
        [*CLI[1:], *args],
        encoding="utf-8",
        timeout=10,
        env=clean_env(**env),
        dimensions=(24, 200),
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    """A terminal user's Ctrl-C: a shell's background job (`make test &`) ignores SIGINT, and its
    children would inherit that through exec, so the CLI would never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(*args: str, check: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30, env=clean_env(**env))
    if check:
        assert done.returncode == 0, done.stderr
    return done


# ---- generate in a terminal ----


def test_text_streams_as_it_comes_and_ctrl_c_interrupts(server: RunningServer) -> None:
    child = spawn("generate", " hello", "--max-tokens", "400", "--address", server.address)
    child.expect("waiting for the first token")  # the spinner, while the prompt is prefilled
    child.expect("cat sat")
    child.expect("Smith")
    assert child.isalive()  # text on screen well before the 20 s generation could end
    started = time.monotonic()
    child.sendintr()
    child.expect(r"\[interrupted: (\d+) tokens .*first token after \d+ ms")
    assert time.monotonic() - started < 2.0
    assert 3 <= int(child.match.group(1)) < 400
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    wait_idle(server)


def test_a_second_ctrl_c_quits_at_once(server: RunningServer) -> None:
    # after_segment waits for a sentence end that the fake model's words never make: only the second
    # Ctrl-C gets us out.
    args = ["--chunking", "sentence", "--interrupt-mode", "after_segment", "--max-tokens", "400"]
    child = spawn("generate", " hello", *args, "--address", server.address)
    child.expect("waiting for the first token")
    time.sleep(0.3)
    child.sendintr()
    time.sleep(0.3)
    assert child.isalive()  # still waiting for the segment to end
    started = time.monotonic()
    child.sendintr()
    child.expect(pexpect.EOF, timeout=2)
    assert time.monotonic() - started < 1.0
    child.close()
    assert child.exitstatus == 130
    wait_idle(server)  # the server saw the connection go and stopped the generation


def test_normal_end_prints_the_summary_without_a_spinner_when_piped(server: RunningServer) -> None:
    done = run("generate", " hello", "-n", "4", "--chunking", "word", "--address", server.address, check=True)
    assert done.stdout == " cat sat. on\n"
    assert done.stderr.startswith("[max_tokens: 4 tokens (12 characters sent), prompt 1 tokens")
    assert "waiting" not in done.stderr and "\r" not in done.stderr


def test_json_prints_one_parsable_object_per_message(server: RunningServer) -> None:
    done = run("generate", " hello", "-n", "3", "--json", "--request-id", "j1", "--address", server.address)
    assert done.returncode == 0 and done.stderr == ""
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert [next(k for k in m if k != "request_id") for m in messages] == [
        "started",
        "chunk",
        "chunk",
        "chunk",
        "finished",
    ]
    assert all(m["request_id"] == "j1" for m in messages)
    assert messages[-1]["finished"]["reason"] == "STOP_REASON_MAX_TOKENS"
    refused = run("generate", " hello", "--top-p", "3", "--json", "--address", server.address)
    assert refused.returncode == 1 and json.loads(refused.stdout)["error"]["field"] == "start.sampling.top_p"


# ---- chat ----


def test_chat_keeps_the_conversation_in_a_session(server: RunningServer) -> None:
    done = subprocess.run(
        [*CLI, "chat", "-n", "3", "-v", "--address", server.address],
        input=" hello\n the\n",
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    replies, summaries = done.stdout.splitlines(), done.stderr.splitlines()
    assert len(replies) == 2 and len(summaries) == 2
    # The second turn sent only its new message; the server prefixed the history and reused its cache.
    first_prompt = int(summaries[0].split("prompt ")[1].split(" ")[0])
    assert "cached" not in summaries[0] and "cached" in summaries[1]
    assert int(summaries[1].split("prompt ")[1].split(" ")[0]) > first_prompt + 3


# ---- the other commands ----


def test_info_health_tokenize(server: RunningServer) -> None:
    info = run("info", "--address", server.address, check=True).stdout
    assert "model              fake" in info and "context_length     1024" in info
    assert (
        json.loads(run("--address", server.address, "info", "--json", check=True).stdout)["vocab_size"] == 15
    )
    assert run("health", "--address", server.address, check=True).stdout == "SERVING\n"
    tokens = run("tokenize", " hello world", check=True, TOKENWIRE_ADDRESS=server.address).stdout
    assert tokens.splitlines() == ["2 tokens", "       3  ' hello'", "       4  ' world'"]


def test_cancel_stops_a_generation_from_elsewhere(server: RunningServer) -> None:
    child = spawn(
        "generate", " hello", "-n", "400", "--request-id", "cli-cancel", "--address", server.address
    )
    child.expect("cat sat")
    cancelled = run("cancel", "cli-cancel", "--address", server.address, check=True)
    assert cancelled.stdout.startswith("cancelled cli-cancel [cancelled: ")
    child.expect(r"\[cancelled: ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    missing = run("cancel", "cli-cancel", "--address", server.address)
    assert missing.returncode == 1 and "no live request" in missing.stdout


def test_errors_exit_1_with_the_code_and_field(server: RunningServer) -> None:
    refused = run("generate", " hello", "--top-p", "3", "--address", server.address)
    assert refused.returncode == 1
    assert refused.stderr.startswith("tokenwire: INVALID_ARGUMENT: start.sampling.top_p:")
    nobody = run("info", "--address", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.3")
    assert nobody.returncode == 1 and "UNAVAILABLE: could not connect" in nobody.stderr


def test_token_from_the_environment() -> None:
    with server_in_thread(auth_token="s3cret") as server:
        refused = run("info", "--address", server.address)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        assert run("info", "--address", server.address, TOKENWIRE_TOKEN="s3cret").returncode == 0
        assert run("info", "--address", server.address, "--token", "s3cret").returncode == 0

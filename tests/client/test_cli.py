"""The `tokenwire` CLI as a person and a script use it: in a pseudo-terminal (pexpect) and through pipes,
against a real server with a slowed-down fake model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pexpect
import pytest

from tests.conftest import FAKE_ENGINE, free_port, running_server
from tests.fake_runner import FakeRunner, ForwardGate, token_id
from tests.waiting import wait_until
from tokenwire.service.engine.requests import StopReason
from tokenwire.service.transport.server import RunningServer

CLI = [sys.executable, "-m", "tokenwire.client.cli"]
STEP_S = 0.05  # one token per 50 ms: a 400-token generation would take 20 s, so it is always mid-way


@contextlib.contextmanager
def server_in_thread(**options: Any) -> Iterator[RunningServer]:
    """running_server on an event loop of its own, so that blocking tests (pexpect, subprocess) can
    drive the CLI while the server keeps serving."""
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[RunningServer] = concurrent.futures.Future()
    stop = asyncio.Event()  # set on `loop`, from this thread, through call_soon_threadsafe

    async def run() -> None:
        async with running_server(FAKE_ENGINE, **options) as server:
            ready.set_result(server)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=10)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with server_in_thread(step_delay=STEP_S, context_length=1024) as server:
        yield server


def wait_idle(server: RunningServer, timeout: float = 5.0) -> None:
    engine = server.engine
    assert engine is not None
    wait_until(engine.is_idle, timeout, what=f"the server's engine idle ({engine.num_live()} live at first)")


def fake(server: RunningServer) -> FakeRunner:
    assert server.engine is not None
    runner = server.engine.runner
    assert isinstance(runner, FakeRunner)
    return runner


@pytest.fixture
def gate(server: RunningServer) -> Iterator[ForwardGate]:
    """The server's fake model, open until the test closes the gate (held where it then is)."""
    runner = fake(server)
    gate = ForwardGate(open=True)
    runner.on_forward = gate
    yield gate
    runner.on_forward = None
    gate.open()


Abort = tuple[str, StopReason, bool]  # request id, reason, after_segment


@pytest.fixture
def aborts(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> queue.SimpleQueue[Abort]:
    """Every engine.abort the server makes (an Interrupt read, a stream gone), as it makes it."""
    engine = server.engine
    assert engine is not None
    made: queue.SimpleQueue[Abort] = queue.SimpleQueue()
    abort = engine.abort

    def recorded(request_id: str, reason: StopReason, *, after_segment: bool = False) -> bool:
        found = abort(request_id, reason, after_segment=after_segment)
        made.put((request_id, reason, after_segment))
        return found

    monkeypatch.setattr(engine, "abort", recorded)
    return made


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


def test_text_streams_as_it_comes_and_ctrl_c_interrupts(
    server: RunningServer, gate: ForwardGate, aborts: queue.SimpleQueue[Abort]
) -> None:
    runner = fake(server)
    before = len(runner.calls)
    child = spawn("generate", " hello", "--max-tokens", "400", "--address", server.address)
    child.expect("waiting for the first token")  # the spinner, while the prompt is prefilled
    child.expect("cat sat")
    child.expect("Smith")
    assert child.isalive()  # text on screen well before the 20 s generation could end
    gate.close()
    gate.wait_held()
    held = len(runner.calls)  # forwards of this generation, a token each, the held one included
    child.sendintr()
    _, reason, after_segment = aborts.get(timeout=10)  # the CLI sent the Interrupt
    assert (reason, after_segment) == (StopReason.INTERRUPTED, False)
    gate.open()
    child.expect(r"\[interrupted: (\d+) tokens .*first token after \d+ ms")
    # It stopped at the next step: the held forward's token was the last; no forward ran after it.
    assert 3 <= int(child.match.group(1)) == held - before < 400
    assert len(runner.calls) == held
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    wait_idle(server)


def test_a_second_ctrl_c_quits_at_once(
    server: RunningServer,
    gate: ForwardGate,
    aborts: queue.SimpleQueue[Abort],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One sentence, then words that never end the next: after_segment waits for a sentence end that
    # never comes, so only the second Ctrl-C gets us out.
    sentence = [token_id(word) for word in ("ĠSmith", "Ġsat", ".", "ĠSmith")]
    monkeypatch.setitem(fake(server).script, token_id("ĠDr"), sentence + [token_id("Ġcat")] * 396)
    args = ["--chunking", "sentence", "--interrupt-mode", "after_segment", "--max-tokens", "400"]
    child = spawn("generate", " Dr", *args, "--address", server.address)
    child.expect_exact(" Smith sat.")  # on screen: the CLI is following the generation
    gate.close()
    gate.wait_held()  # the model holds mid-sentence: the generation cannot end while the test looks
    child.sendintr()
    request_id, reason, after_segment = aborts.get(timeout=10)  # the CLI sent the Interrupt
    assert (reason, after_segment) == (StopReason.INTERRUPTED, True)
    assert child.isalive()  # still waiting for the segment to end
    child.sendintr()
    child.expect(pexpect.EOF)  # with the model held, only quitting could end it
    child.close()
    assert child.exitstatus == 130
    assert server.engine is not None and server.engine.num_live() == 1  # it did not wait for the end
    # The server saw the connection go and stopped the generation.
    assert aborts.get(timeout=10) == (request_id, StopReason.CANCELLED, False)
    gate.open()
    wait_idle(server)


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

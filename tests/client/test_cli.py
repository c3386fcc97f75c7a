"""The `tokenwire` CLI as a person and a script use it: in a pseudo-terminal (pexpect) and through pipes,
against a real server with a slowed-down fake model."""

from __future__ import annotations

import argparse
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
from tokenwire.client._pieces import piece_bytes, show_piece
from tokenwire.client.cli import build_parser
from tokenwire.service.engine.requests import StopReason, Tokenized
from tokenwire.service.model.types import SamplingParams
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

    def recorded(
        request_id: str, reason: StopReason, *, owner: str = "", after_segment: bool = False
    ) -> bool:
        found = abort(request_id, reason, owner=owner, after_segment=after_segment)
        made.put((request_id, reason, after_segment))
        return found

    monkeypatch.setattr(engine, "abort", recorded)
    return made


Admitted = tuple[SamplingParams, int]  # a sequence's sampling settings and seed


@pytest.fixture
def admitted(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> queue.SimpleQueue[Admitted]:
    """The sampling settings and seed of every sequence the fake model starts, as it starts it."""
    runner = fake(server)
    made: queue.SimpleQueue[Admitted] = queue.SimpleQueue()
    add = runner.add_sequence

    def recorded(seq_id: int, sampling: SamplingParams, seed: int, **kwargs: Any) -> None:
        made.put((sampling, seed))
        add(seq_id, sampling, seed, **kwargs)

    monkeypatch.setattr(runner, "add_sequence", recorded)
    return made


@pytest.fixture
def short_replies(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chat replies of two words: a chat prompt starts with the fake template's BOS, scripted here
    (unscripted, a chat reply would run to the CLI's 512-token cap, 50 ms a token)."""
    runner = fake(server)
    monkeypatch.setitem(runner.script, runner.bos_token_id, [token_id("Ġhello"), token_id("Ġworld")])
    return " hello world"


def clean_env(**extra: str) -> dict[str, str]:
    # gRPC's log settings too: with -v (chat's summaries) they would add lines to stderr.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TOKENWIRE_") and k not in ("GRPC_VERBOSITY", "GRPC_TRACE")
    }
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


def run(
    *args: str, check: bool = False, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, *args], input=input, capture_output=True, text=True, timeout=30, env=clean_env(**env)
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


# ---- generate in a terminal ----


def test_text_streams_as_it_comes_and_ctrl_c_interrupts(
    server: RunningServer, gate: ForwardGate, aborts: queue.SimpleQueue[Abort]
) -> None:
    runner = fake(server)
    before = len(runner.calls)
    child = spawn("generate", " hello", "--raw", "--max-tokens", "400", "--address", server.address)
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
    child = spawn("generate", " Dr", "--raw", *args, "--address", server.address)
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
    done = run(
        "generate",
        " hello",
        "--raw",
        "-n",
        "4",
        "--chunking",
        "word",
        "--address",
        server.address,
        check=True,
    )
    assert done.stdout == " cat sat. on\n"
    assert done.stderr.startswith("[max_tokens: 4 tokens (12 characters sent), prompt 1 token")
    assert "waiting" not in done.stderr and "\r" not in done.stderr


def test_json_prints_one_parsable_object_per_message(server: RunningServer) -> None:
    done = run(
        "generate", " hello", "--raw", "-n", "3", "--json", "--request-id", "j1", "--address", server.address
    )
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


def started(stdout: str) -> dict[str, Any]:
    """The Started message of `generate --json`'s output."""
    first = json.loads(stdout.splitlines()[0])
    assert "started" in first, first
    return dict(first["started"])


def test_generate_sends_a_user_message_when_the_model_has_a_chat_template(
    server: RunningServer, short_replies: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = ["--address", server.address]
    chat = run("generate", " hello", "--json", *address, check=True)
    # The fake chat template puts its BOS before the message: two tokens where plain text has one.
    assert started(chat.stdout)["prompt_tokens"] == 2
    assert run("generate", " hello", "--chat", "--json", *address, check=True).stdout.count("started") == 1
    raw = run("generate", " hello", "--raw", "-n", "2", "--json", *address, check=True)
    assert started(raw.stdout)["prompt_tokens"] == 1
    refused = run("generate", " hello", "--raw", "--system", "Be brief.", *address)
    assert refused.returncode == 1 and "--raw" in refused.stderr
    monkeypatch.setattr(fake(server), "has_chat_template", False)
    plain = run("generate", " hello", "-n", "2", "--json", *address, check=True)
    assert started(plain.stdout)["prompt_tokens"] == 1  # no template: the text goes as it is
    assert "--raw" in run("generate", "--help", check=True).stdout


def test_chat_mode_samples_with_a_penalty_and_a_length_cap(
    server: RunningServer, short_replies: str, admitted: queue.SimpleQueue[Admitted]
) -> None:
    address = ["--address", server.address]
    chat = run("generate", " hello", *address, check=True)
    assert chat.stdout == short_replies + "\n"
    sampling, seed = admitted.get(timeout=10)
    assert sampling.temperature == pytest.approx(0.7) and sampling.repetition_penalty == pytest.approx(1.1)
    assert chat.stderr.rstrip().endswith(f", seed {seed}]")  # the summary says how to replay it
    # The cap: the context (1024) leaves 1022 tokens after the prompt; the CLI asks for 512.
    assert started(run("generate", " hello", "--json", *address, check=True).stdout)["max_tokens"] == 512
    admitted.get(timeout=10)

    # Flags win: greedy, no penalty, a seed, no cap.
    given = ["-t", "0", "--repetition-penalty", "1", "--seed", "7", "-n", "0", "--json"]
    greedy = started(run("generate", " hello", *given, *address, check=True).stdout)
    sampling, seed = admitted.get(timeout=10)
    assert (sampling.temperature, sampling.repetition_penalty, seed) == (0.0, 1.0, 7)
    assert greedy["seed"] == "7" and greedy["max_tokens"] == 1022

    # Plain completion keeps the server's defaults: nothing is sent.
    raw = run("generate", " hello", "--raw", "-n", "2", *address, check=True)
    sampling, _ = admitted.get(timeout=10)
    assert (sampling.temperature, sampling.repetition_penalty) == (0.0, 1.0)
    assert "seed" not in raw.stderr  # greedy: no seed to replay

    for flag in ("--temperature", "--repetition-penalty", "--max-tokens"):
        shown = run("chat", "--help", check=True).stdout.replace("\n", " ")
        assert flag in shown
    assert "default 0.7" in shown and "default 1.1" in shown and "default 512" in shown


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


def test_chat_uses_one_seed_for_the_conversation(
    server: RunningServer, short_replies: str, admitted: queue.SimpleQueue[Admitted]
) -> None:
    done = run("chat", "-v", "--address", server.address, input=" hello\n the\n", check=True)
    assert done.stdout == f"{short_replies}\n{short_replies}\n"
    seeds = {admitted.get(timeout=10)[1] for _ in range(2)}
    assert len(seeds) == 1  # one seed, chosen at the start...
    seed = seeds.pop()
    summaries = done.stderr.splitlines()
    assert len(summaries) == 2 and all(line.endswith(f", seed {seed}]") for line in summaries)
    run("chat", "--seed", "42", "--address", server.address, input=" hello\n", check=True)
    assert admitted.get(timeout=10)[1] == 42  # ...or given, to replay one


def test_chat_slash_commands(
    server: RunningServer, short_replies: str, admitted: queue.SimpleQueue[Admitted]
) -> None:
    lines = [
        "/help",
        "/set temperature 0.2",
        "/set top_k 5",
        "/set temperature hot",
        "/set nonsense 1",
        "/set",
        " hello",
        "/reset",
        " hello",
        "/frobnicate",
        "//set is a message",
        "/bye",
        " never sent",
    ]
    done = run("chat", "-v", "--address", server.address, input="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{short_replies}\n" * 3  # three turns; nothing after /bye
    turns = [admitted.get(timeout=10) for _ in range(3)]
    assert all(s.temperature == pytest.approx(0.2) and s.top_k == 5 for s, _ in turns)
    assert admitted.empty()
    err = done.stderr
    assert all(command in err for command in ("/set NAME VALUE", "/reset", "/bye", "/help"))  # /help
    assert "temperature 0.2\n" in err and "top-k 5\n" in err
    assert "/set: temperature takes a number, not 'hot'" in err
    assert "/set: no setting 'nonsense'" in err
    assert "repetition-penalty  1.1\n" in err  # the /set table
    assert "unknown command /frobnicate: /help lists them" in err
    # /reset started a new session: its first turn found no cache; the turn after it did.
    summaries = [line for line in err.splitlines() if line.startswith("[")]
    assert len(summaries) == 3
    assert ["cached" in line for line in summaries] == [False, False, True]


def test_chat_reset_with_a_session_id_starts_a_fresh_one(server: RunningServer, short_replies: str) -> None:
    done = run(
        "chat", "-v", "--session", "mine", "--address", server.address, input=" hello\n/reset\n hello\n"
    )
    assert done.returncode == 0, done.stderr
    fresh = done.stderr.split("a new one starts: session ", 1)[1].split(")")[0]
    assert fresh.startswith("mine-") and len(fresh) > len("mine-")
    assert "cached" not in done.stderr  # the second turn did not continue "mine"


def test_chat_at_a_terminal_shows_its_settings_and_survives_a_refused_turn(
    server: RunningServer, short_replies: str
) -> None:
    child = spawn("chat", "--address", server.address)
    child.expect(r"temperature 0.7, seed (\d+), repetition penalty 1.1, at most 512 tokens a reply")
    child.expect_exact("you> ")
    child.sendline("/set top-p 3")
    child.expect_exact("you> ")
    child.sendline(" hello")
    child.expect("INVALID_ARGUMENT: start.sampling.top_p")  # said, and the chat goes on
    child.expect_exact("you> ")
    child.sendline("/set top-p 1")
    child.expect_exact("you> ")
    child.sendline(" hello")
    child.expect_exact(short_replies)
    child.expect_exact("you> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_checks_the_server_before_the_first_prompt() -> None:
    address = f"127.0.0.1:{free_port()}"
    child = spawn("chat", "--address", address)
    child.expect(pexpect.EOF)  # without waiting for a line
    child.close()
    assert child.exitstatus == 1
    assert "you>" not in child.before
    assert f"could not connect to {address}: connection refused" in child.before


# ---- connecting ----


def test_a_refused_connection_fails_at_once_naming_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    # A generous connect timeout: the message says the first refusal ended it, not the timeout.
    for command in (["info"], ["generate", "hi"], ["tokenize", "hi"], ["cancel", "x"], ["health"]):
        done = run(*command, "--address", address, "--connect-timeout", "20")
        assert done.returncode == 1
        assert done.stderr == f"tokenwire: UNAVAILABLE: could not connect to {address}: connection refused\n"
    # --wait keeps trying until the connect timeout, then says why the last attempt failed.
    waited = run("health", "--wait", "--address", address, "--connect-timeout", "0.3")
    assert waited.returncode == 1
    assert waited.stderr.endswith(f"could not connect to {address} within 0.3 s: connection refused\n")


def test_bad_addresses_are_named() -> None:
    for address, said in [
        ("127.0.0.1:port", "INVALID_ARGUMENT: invalid address '127.0.0.1:port': expected HOST:PORT"),
        ("http://127.0.0.1:50051", "INVALID_ARGUMENT: invalid address 'http://127.0.0.1:50051'"),
        (
            "no-such-host.invalid:50051",
            "UNAVAILABLE: could not connect to no-such-host.invalid:50051: unknown host",
        ),
    ]:
        done = run("info", "--address", address, "--connect-timeout", "20")
        assert done.returncode == 1 and done.stderr.startswith(f"tokenwire: {said}"), done.stderr
        assert len(done.stderr.splitlines()) == 1


def test_tls_against_a_plaintext_server_is_one_line_unless_verbose(server: RunningServer) -> None:
    # The environment asks gRPC for its logs; only --verbose lets them through.
    noisy = {"GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "handshaker"}
    done = run("info", "--tls", "--address", server.address, **noisy)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"tokenwire: UNAVAILABLE: could not connect to {server.address}: "
        "TLS handshake failed: the server does not seem to use TLS"
    ]
    verbose = run("info", "--tls", "--verbose", "--address", server.address, **noisy)
    assert verbose.returncode == 1 and len(verbose.stderr.splitlines()) > 1
    assert verbose.stderr.splitlines()[-1] == done.stderr.strip()


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
        "generate", " hello", "--raw", "-n", "400", "--request-id", "cli-cancel", "--address", server.address
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


# What the default model's tokenizer (SmolLM2) gives for this text: an emoji and two CJK characters
# it has no tokens for are split into byte tokens, each decoded alone to U+FFFD.
SPLIT_TEXT = "a🙂 ok 日本語 é"
SPLIT_TOKENS = Tokenized(
    [81, 10813, 38887, 10907, 17097, 241, 115, 40993, 179, 120, 248, 26411],
    [
        "a",
        "\ufffd",
        "\ufffd\ufffd",
        " ok",
        " \ufffd",
        "\ufffd",
        "\ufffd",
        "本",
        "\ufffd",
        "\ufffd",
        "\ufffd",
        " é",
    ],
)


def test_tokenize_shows_the_bytes_of_byte_tokens(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def tokenize_text(text: str) -> Tokenized:
        assert text == SPLIT_TEXT
        return SPLIT_TOKENS

    assert server.engine is not None
    monkeypatch.setattr(server.engine, "tokenize_text", tokenize_text)
    shown = run("tokenize", SPLIT_TEXT, "--address", server.address, check=True).stdout.splitlines()
    assert shown == [
        "12 tokens",
        "      81  'a'",
        "   10813  <0xF0><0x9F>",
        "   38887  <0x99><0x82>",
        "   10907  ' ok'",
        "   17097  ' '<0xE6>",
        "     241  <0x97>",
        "     115  <0xA5>",
        "   40993  '本'",
        "     179  <0xE8>",
        "     120  <0xAA>",
        "     248  <0x9E>",
        "   26411  ' é'",
    ]
    as_json = json.loads(
        run("tokenize", SPLIT_TEXT, "--json", "--address", server.address, check=True).stdout
    )
    assert as_json == {"token_ids": SPLIT_TOKENS.token_ids, "tokens": SPLIT_TOKENS.tokens}  # the proto's


def test_piece_bytes_lines_pieces_up_with_the_text() -> None:
    found = piece_bytes(SPLIT_TEXT, SPLIT_TOKENS.tokens)
    assert found is not None and b"".join(found) == SPLIT_TEXT.encode()
    # In a chat template: the template's pieces around the message, one of them straddling its start.
    template = ["<|im_start|>", "user", "\n", *SPLIT_TOKENS.tokens[1:], "<|im_end|>", "\n"]
    template[2] = "\na"
    found = piece_bytes(SPLIT_TEXT, template)
    assert found is not None and [show_piece(b) for b in found[2:5]] == [
        "'\\na'",
        "<0xF0><0x9F>",
        "<0x99><0x82>",
    ]
    assert piece_bytes("hello", ["good", "bye"]) is None  # pieces of something else
    assert piece_bytes("\U0001f642", ["\ufffd"]) is None  # four bytes cannot decode to one U+FFFD
    assert show_piece(" \xe6".encode("latin-1")) == "' '<0xE6>"


def test_cancel_json_says_what_the_server_said(server: RunningServer) -> None:
    missing = run("cancel", "nobody", "--json", "--address", server.address)
    assert missing.returncode == 1 and json.loads(missing.stdout) == {"found": False}
    child = spawn(
        "generate", " hello", "--raw", "-n", "400", "--request-id", "cj", "--address", server.address
    )
    child.expect("cat sat")
    found = json.loads(run("cancel", "cj", "--json", "--address", server.address, check=True).stdout)
    assert found["found"] is True and found["summary"]["reason"] == "STOP_REASON_CANCELLED"
    assert found["summary"]["usage"]["completion_tokens"] >= 2
    child.expect(pexpect.EOF)
    child.close()
    wait_idle(server)


def test_every_argument_of_every_command_is_documented() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    undocumented = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in {"tokenwire": parser, **commands.choices}.items()
        for action in command._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert undocumented == []

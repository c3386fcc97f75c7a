"""Shared fixtures: a real grpc.aio tokenwire server on 127.0.0.1:0 over an engine with the fake runner."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# The CLI tests spawn their child through a pty (fork, then exec) while this process runs gRPC
# servers on other threads. gRPC's fork handlers then run in the child ("Other threads are
# currently calling into gRPC, skipping fork() handlers") and once crashed it before it reached
# exec (a segfault in a fresh-clone CI run). The child only execs, so it needs no fork support.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest

from tests.fake_runner import FakeRunner
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.transport.server import RunningServer, ServerConfig, serve


def pytest_sessionstart(session: pytest.Session) -> None:
    """The C kernels are the production path: without them every model test would pass on torch's
    fallbacks and say nothing about what serves. So a run without them fails, saying why, unless
    TOKENWIRE_NATIVE=0 asks for the fallbacks on purpose."""
    if os.environ.get("TOKENWIRE_NATIVE") == "0":
        return
    from tokenwire.service.kernels import ops  # torch: only here, not for every test module

    try:
        ops.pick_build()
    except ops.NotBuilt as exc:
        pytest.exit(f"the C kernels are not built: {exc}", returncode=1)


# What `served` runs with; tests that need other limits pass their own to `running_server`.
FAKE_ENGINE = EngineConfig(max_batch_size=4, prefill_tokens_per_step=64, max_live_requests=32)


@contextlib.asynccontextmanager
async def running_server(
    engine_config: EngineConfig = FAKE_ENGINE,
    *,
    step_delay: float = 0.002,
    context_length: int = 256,
    **server_options: Any,
) -> AsyncIterator[RunningServer]:
    """A started server over a fresh engine with the fake runner; drained and stopped on exit.
    `server_options` are ServerConfig fields (auth_token, tls_cert, max_message_bytes, ...)."""
    runner = FakeRunner(
        max_batch_size=engine_config.max_batch_size, context_length=context_length, step_delay=step_delay
    )
    engine = Engine(runner, engine_config)
    engine.start()
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, grace_period_s=0.0, health_interval_s=0.1)
    server = await serve(engine, dataclasses.replace(config, **server_options))
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def served() -> AsyncIterator[RunningServer]:
    """A tokenwire server on a free port: use `.address` to connect and `.engine` to look inside."""
    async with running_server() as server:
        yield server


async def wait_until_idle(engine: Engine, timeout: float = 2.0) -> float:
    """Poll until the engine holds no request and no KV row; returns how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not engine.is_idle():
        if loop.time() - started > timeout:
            raise AssertionError(f"engine still busy after {timeout} s: {engine.num_live()} live")
        await asyncio.sleep(0.005)
    return loop.time() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- TLS material for the TLS tests ----


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and two client certificates."""
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tokenwire test CA",
        cwd=d,
    )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for client in ("client", "client2"):  # two callers: principals by certificate
        (d / f"{client}.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client", "client2"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
        )  # fmt: skip
    return d

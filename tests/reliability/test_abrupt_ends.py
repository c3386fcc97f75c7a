"""Clients that end without a goodbye: killed, exited mid-stream, frozen, or never speaking gRPC at all.

The clients are separate processes, so the server (in this process, where the engine can be watched)
learns of their end only from the socket, as it would in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import time

import grpc

from tests.conftest import wait_until_idle
from tests.reliability.conftest import ROOT, Leaks, engine_of, fake_server, python_env
from tests.reliability.contract import check_generation, read_rest, start
from tokenwire.service.transport.server import RunningServer
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc

STEP_S = 0.01  # one decode step of the fake runner here; a generation left alone runs ~10 s


async def _client(address: str, request_id: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.client_main",
        address,
        request_id,
        *args,
        cwd=ROOT,
        env=python_env(),
        stdout=asyncio.subprocess.PIPE,
    )


async def _chunks_seen(process: asyncio.subprocess.Process, count: int) -> None:
    """Wait until the client has printed `count` chunks (so its generation is surely running)."""
    assert process.stdout is not None
    seen = 0

    async def run() -> None:
        nonlocal seen
        while seen < count:
            line = await process.stdout.readline()  # type: ignore[union-attr]
            assert line, "the client ended early"
            seen += line.strip() == b"chunk"

    await asyncio.wait_for(run(), 30)


async def _freed_within(server: RunningServer, since: float) -> float:
    """Poll until the engine is idle (about one decode step, a 1 s ceiling); seconds since `since`."""
    await wait_until_idle(engine_of(server), timeout=1.0)
    return time.monotonic() - since


async def _still_serves(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = pb_grpc.TokenWireStub(channel).Generate()
        await call.write(start("after", 3))
        await call.done_writing()
        assert check_generation(await read_rest(call)).reason == pb.STOP_REASON_MAX_TOKENS


async def test_client_killed_with_sigkill_mid_stream() -> None:
    async with fake_server(step_delay=STEP_S) as server:
        leaks = Leaks()
        process = await _client(server.address, "killed")
        await _chunks_seen(process, 3)
        assert engine_of(server).num_live() == 1
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await process.wait()
        took = await _freed_within(server, killed)
        steps = took / STEP_S
        print(f"\nSIGKILLed client: request freed {took * 1000:.0f} ms after the kill ({steps:.1f} steps)")
        await _still_serves(server)
        await leaks.check()


async def test_client_exits_without_closing_its_stream() -> None:
    async with fake_server(step_delay=STEP_S) as server:
        leaks = Leaks()
        process = await _client(server.address, "exited", "--exit-after", "3")
        assert await asyncio.wait_for(process.wait(), 30) == 0  # os._exit after its third chunk
        exited = time.monotonic()
        took = await _freed_within(server, exited)
        print(f"\nclient os._exit mid-stream: request freed {took * 1000:.0f} ms after it exited")
        await _still_serves(server)
        await leaks.check()


async def test_frozen_client_is_found_by_keepalive() -> None:
    """A stopped process sends nothing, not even a FIN (like a host that lost power): the server's
    keepalive ping goes unanswered and the connection, with its requests, is dropped."""
    async with fake_server(step_delay=STEP_S, keepalive_time_s=0.3, keepalive_timeout_s=0.3) as server:
        process = await _client(server.address, "frozen")
        try:
            await _chunks_seen(process, 3)
            process.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()
            await wait_until_idle(engine_of(server), timeout=5.0)
            took = time.monotonic() - frozen
            print(f"\nfrozen client: request freed {took:.2f} s after SIGSTOP (keepalive 0.3 s + 0.3 s)")
            assert took < 2.0  # keepalive time + timeout, and a step
        finally:
            process.kill()  # SIGKILL ends a stopped process too
            await process.wait()
        await _still_serves(server)


async def _raw_connection(address: str, payload: bytes, *, reset: bool) -> None:
    host, port = address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    await asyncio.sleep(0.02)  # let the server read it
    if reset:  # close with RST instead of FIN: SO_LINGER on, timeout 0
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def test_raw_sockets_that_never_finish_a_call() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payloads = [
        b"",  # connect, then go
        preface[:10],  # half a preface
        preface,  # a preface and no SETTINGS
        preface + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + os.urandom(64),  # SETTINGS, then noise
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # the wrong protocol
        os.urandom(4096),
    ]
    async with fake_server(step_delay=0.001) as server:
        leaks = Leaks()
        for payload in payloads:
            for reset in (False, True):
                await _raw_connection(server.address, payload, reset=reset)
        await _still_serves(server)
        await wait_until_idle(engine_of(server))
        await leaks.check()
    print(f"\nraw sockets: {2 * len(payloads)} connections closed (FIN or RST) without a gRPC call")
